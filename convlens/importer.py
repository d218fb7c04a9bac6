"""Import transformers' live conversion mapping as ``.conv`` text.

transformers (``transformers.conversion_mapping``) keeps, per model type or class name, a list of
transforms: ``WeightRenaming`` (unanchored regexes), ``PrefixChange``, ``GroupWeightRename``, the
index-offset rename, and ``WeightConverter`` with tensor ops. :func:`import_transformers` reads one
registry entry (:func:`import_model` the list that ``get_model_conversion_mapping`` assembles for a
built model, with its scoped sub-model rules) and writes a conversion file:

- a regex source becomes anchored, segment-aware patterns. ``^`` anchors at the root; a pattern
  that may match anywhere becomes two rules (at the root, and below ``{p*}``); captured groups
  (``(\\d+)``, ``(.+)``, ``(a|b)``) become captures that both sides bind; negative lookaheads and
  lookbehinds become ``unless`` guards on the next segment or on the prefix; scope prefixes of
  sub-models become literal pattern prefixes;
- converter ops map to convlens ops: ``MergeModulelist`` -> ``stack``, ``Concatenate`` ->
  ``concat``, ``Chunk`` -> ``split``, ``SplitModulelist`` -> ``unstack``, ``Split`` -> ``split``
  with sizes from config (known q/k/v layouts), ``Interleave`` -> ``deinterleave``/``interleave``,
  ``Transpose`` -> ``transpose`` with declared axes, ``PermuteForRope`` -> ``rope_permute``,
  ``Conv3dToLinear`` -> ``flatten``, the Ernie many-to-many op -> one ``stack, concat`` rule per
  target, each over its contiguous group of experts (``{e:int<N}``, ``{e+N}``);
- the index-offset rename -> an expression capture (``{i+1}``), ``LayerPairCollapse`` -> one
  rename per block parity (``layers.{2*i}.mixer`` -> ``layers.{i:int}.self_attn``);
- every emitted rule is checked against transformers itself: an example key is renamed by
  transformers' own transforms and by the compiled rules, and the agreement is written as an
  ``expect`` line. Then the file is compiled and checked like ``convlens check`` does.

What cannot be translated faithfully (custom ops, a rule the checks refuse, a rule whose
example key transformers maps differently) is left out, listed as
:class:`Untranslatable` with its reason and written into the text as a comment, never
approximated.

Conventions, stated in every emitted file: convlens patterns match whole dot-separated segments,
so transformers' matches inside a segment (``fc2`` inside ``xfc21``) and its unescaped ``.``
(any character) are read as segment boundaries; a stem carries its leaves and known suffix
siblings (``_weight_scale``), where transformers' ``(?!\\w)`` guard stops at ``_``.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from convlens.errors import ConvlensError, ErrorGroup

__all__ = [
    "ImportResult",
    "Untranslatable",
    "import_all",
    "import_model",
    "import_transformers",
    "registry",
    "summary",
    "translate_transforms",
]


@dataclass(frozen=True)
class Untranslatable:
    """One transformers transform (or part of one) that the importer did not translate."""

    key: str  # the registry key (model type or class name) or the model's name
    item: str  # the transform, as transformers prints it
    reason: str


@dataclass
class ImportResult:
    """The ``.conv`` text for one registry entry and what it leaves out."""

    name: str
    text: str
    untranslatable: list[Untranslatable] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    rules: int = 0  # rule statements in the text
    expects: int = 0
    checked: bool = False  # compiled and passed check_program

    @property
    def complete(self) -> bool:
        """Every transform translated, and the file passed the checks."""
        return self.checked and not self.untranslatable


class _Unsupported(Exception):
    """A construct the translation cannot express faithfully; the message is the reason."""


# --- transformers' regexes -> a small AST -----------------------------------------------------


@dataclass(frozen=True)
class _Chr:
    c: str
    loose: bool = False  # an unescaped '.', which transformers reads as any character


@dataclass(frozen=True)
class _Cls:
    chars: tuple[str, ...]
    digits: bool = False


@dataclass(frozen=True)
class _Rep:
    node: _RNode
    min: int


@dataclass(frozen=True)
class _Grp:
    kind: str  # cap, noncap, nla (?!, nlb (?<!, pla (?=, plb (?<=
    alts: tuple[tuple[_RNode, ...], ...]
    index: int = 0  # capture group number, 0 if not capturing


@dataclass(frozen=True)
class _Start:
    pass


_RNode = _Chr | _Cls | _Rep | _Grp | _Start
_DIGITS = tuple("0123456789")
_LITERAL_ESCAPES = set(".-_/[](){}*+?|^$\\:")


class _RegexParser:
    """The regex subset that transformers' mappings use: literals, ``\\.``, ``\\d``, classes,
    ``.``/``.*``/``.+``, groups (capturing, ``(?:``, ``(?!``, ``(?<!``), ``|`` and ``^``."""

    def __init__(self, text: str) -> None:
        self.t = text
        self.i = 0
        self.groups = 0

    def parse(self) -> tuple[tuple[_RNode, ...], ...]:
        alts = self._alts()
        if self.i != len(self.t):
            raise _Unsupported(f"cannot read the regex {self.t!r} at {self.t[self.i:]!r}")
        return alts

    def _alts(self) -> tuple[tuple[_RNode, ...], ...]:
        out = [self._seq()]
        while self.i < len(self.t) and self.t[self.i] == "|":
            self.i += 1
            out.append(self._seq())
        return tuple(out)

    def _seq(self) -> tuple[_RNode, ...]:
        items: list[_RNode] = []
        while self.i < len(self.t) and self.t[self.i] not in "|)":
            atom = self._atom()
            if self.i < len(self.t) and self.t[self.i] in "*+?":
                q = self.t[self.i]
                self.i += 1
                if q == "?" or (self.i < len(self.t) and self.t[self.i] == "?"):
                    raise _Unsupported(f"optional or lazy quantifier in {self.t!r}")
                items.append(_Rep(atom, 0 if q == "*" else 1))
            else:
                items.append(atom)
        return tuple(items)

    def _atom(self) -> _RNode:
        t, c = self.t, self.t[self.i]
        self.i += 1
        if c == "^":
            return _Start()
        if c == "$":
            raise _Unsupported(f"'$' anchor in {t!r}")
        if c == ".":
            return _Chr(".", loose=True)
        if c == "\\":
            if self.i >= len(t):
                raise _Unsupported(f"trailing backslash in {t!r}")
            d = t[self.i]
            self.i += 1
            if d == "d":
                return _Cls(_DIGITS, digits=True)
            if d in _LITERAL_ESCAPES:
                return _Chr(d)
            raise _Unsupported(f"escape \\{d} in {t!r}")
        if c == "[":
            end = t.find("]", self.i)
            if end < 0 or t[self.i] == "^":
                raise _Unsupported(f"character class in {t!r}")
            body, self.i = t[self.i:end], end + 1
            chars: list[str] = []
            k = 0
            while k < len(body):
                if k + 2 < len(body) and body[k + 1] == "-":
                    chars += [chr(x) for x in range(ord(body[k]), ord(body[k + 2]) + 1)]
                    k += 3
                else:
                    chars.append(body[k])
                    k += 1
            return _Cls(tuple(chars), digits=tuple(chars) == _DIGITS)
        if c == "(":
            kind = "cap"
            for prefix, group_kind in (("?:", "noncap"), ("?!", "nla"), ("?<!", "nlb"),
                                       ("?=", "pla"), ("?<=", "plb")):
                if t.startswith(prefix, self.i):
                    kind = group_kind
                    self.i += len(prefix)
                    break
            index = 0
            if kind == "cap":
                self.groups += 1
                index = self.groups
            alts = self._alts()
            if self.i >= len(t) or t[self.i] != ")":
                raise _Unsupported(f"unbalanced group in {t!r}")
            self.i += 1
            return _Grp(kind, alts, index)
        if c in "*+?{}":
            raise _Unsupported(f"quantifier {c!r} without an atom in {t!r}")
        return _Chr(c)


def _strings(seq: Sequence[_RNode], limit: int = 256) -> list[str] | None:
    """Every literal string a group-free sequence matches (loose dots read as dots), or None."""
    out = [""]
    for n in seq:
        if isinstance(n, _Chr):
            opts = [n.c]
        elif isinstance(n, _Cls):
            opts = list(n.chars)
        elif isinstance(n, _Grp) and n.kind in ("cap", "noncap"):
            opts = []
            for alt in n.alts:
                s = _strings(alt, limit)
                if s is None:
                    return None
                opts += s
        else:
            return None
        out = [a + b for a in out for b in opts]
        if len(out) > limit:
            return None
    return out


# --- linear atoms: one regex alternative as literal text, captures and lookarounds -----------


@dataclass(frozen=True)
class _Lit:
    text: str


@dataclass(frozen=True)
class _Int:
    pass


@dataclass(frozen=True)
class _Wild:
    min: int


@dataclass(frozen=True)
class _Alt:
    values: tuple[str, ...]


@dataclass(frozen=True)
class _Look:
    ahead: bool
    strings: tuple[str, ...]


@dataclass(frozen=True)
class _Mark:
    open: bool  # the bounds of capture group 1 (what a target's \1 stands for)


@dataclass(frozen=True)
class _Anchor:
    pass


_Atom = _Lit | _Int | _Wild | _Alt | _Look | _Mark | _Anchor
_WORD = re.compile(r"[A-Za-z0-9_]+\Z")


def _linear(seq: Sequence[_RNode]) -> list[list[_Atom]]:
    variants: list[list[_Atom]] = [[]]
    for n in seq:
        opts = _options(n)
        variants = [v + o for v in variants for o in opts]
        if len(variants) > 32:
            raise _Unsupported("too many alternatives")
    return [_merge_lits(v) for v in variants]


def _merge_lits(atoms: list[_Atom]) -> list[_Atom]:
    out: list[_Atom] = []
    for a in atoms:
        if isinstance(a, _Lit) and out and isinstance(out[-1], _Lit):
            out[-1] = _Lit(out[-1].text + a.text)
        else:
            out.append(a)
    return out


def _options(n: _RNode) -> list[list[_Atom]]:
    if isinstance(n, _Chr):
        return [[_Lit(n.c)]]
    if isinstance(n, _Start):
        return [[_Anchor()]]
    if isinstance(n, _Cls):
        return [[_Lit(c)] for c in n.chars]
    if isinstance(n, _Rep):
        if isinstance(n.node, _Cls) and n.node.digits and n.min == 1:
            return [[_Int()]]
        if isinstance(n.node, _Chr) and n.node.loose:
            return [[_Wild(n.min)]]
        raise _Unsupported("a repeated atom other than \\d+, .* or .+")
    if n.kind in ("pla", "plb"):
        raise _Unsupported("positive lookaround")
    if n.kind in ("nla", "nlb"):
        strs: list[str] = []
        for alt in n.alts:
            s = _strings(alt)
            if s is None:
                raise _Unsupported("a lookaround that is not a set of literal names")
            strs += s
        return [[_Look(ahead=n.kind == "nla", strings=tuple(strs))]]
    wrap = n.kind == "cap" and n.index == 1
    if len(n.alts) > 1:
        words = [s for alt in n.alts for s in (_strings(alt) or [""])]
        alt_atoms: list[_Atom] | None = None
        if all(_WORD.match(w) for w in words):
            alt_atoms = [_Alt(tuple(words))]
        elif all(w.endswith(".") and _WORD.match(w[:-1]) for w in words):
            alt_atoms = [_Alt(tuple(w[:-1] for w in words)), _Lit(".")]
        if alt_atoms is not None:
            return [[_Mark(True), *alt_atoms, _Mark(False)]] if wrap else [alt_atoms]
    out: list[list[_Atom]] = []
    for alt in n.alts:
        for v in _linear(alt):
            out.append([_Mark(True), *v, _Mark(False)] if wrap else v)
    return out


# --- rendering a source/target pair as convlens patterns ------------------------------------


class _Names:
    """Capture names unique within one rule."""

    def __init__(self) -> None:
        self.used: set[str] = set()

    def new(self, base: str) -> str:
        name, k = base, 2
        while name in self.used:
            name, k = f"{base}{k}", k + 1
        self.used.add(name)
        return name


@dataclass
class _Guard:
    capture: str
    negate: bool
    values: tuple[str, ...]

    def text(self) -> str:
        word = "unless" if self.negate else "where"
        vals = ", ".join(_q(v) for v in self.values)
        return f"{word} {self.capture} in ({vals})"


@dataclass
class _Source:
    """One regex alternative rendered as a convlens pattern fragment."""

    text: str  # may start with '.' (glued to a prefix) and end with '.'
    anchored: bool
    group1: str | None
    captures: list[str]
    guards: list[_Guard]
    behind: list[str]  # lookbehind strings at the start
    ahead: list[str] | None  # a lookahead after the end (on the next segment)
    mid_segment_end: bool  # the source ends inside a segment (e.g. with '_')
    stacked: str | None = None  # the capture a '*' became for a stack


def _q(s: str) -> str:
    return '"' + s.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _render_source(atoms: list[_Atom], names: _Names, *, stack: bool, raw_end: str) -> _Source:
    atoms = list(atoms)
    anchored = False
    lead = 0
    while lead < len(atoms) and isinstance(atoms[lead], (_Anchor, _Mark)):
        if isinstance(atoms[lead], _Anchor):
            anchored = True
            atoms.pop(lead)
        else:
            lead += 1
    if any(isinstance(a, _Anchor) for a in atoms):
        raise _Unsupported("'^' inside the pattern")
    behind: list[str] = []
    while atoms and isinstance(atoms[0], _Look) and not atoms[0].ahead:
        look = atoms.pop(0)
        assert isinstance(look, _Look)
        if not anchored:
            behind += look.strings
    ahead: list[str] | None = None
    while atoms and isinstance(atoms[-1], _Look):
        look = atoms.pop()
        assert isinstance(look, _Look)
        if not look.ahead:
            raise _Unsupported("a lookbehind at the end of the pattern")
        ahead = (ahead or []) + list(look.strings)
    parts: list[str] = []
    captures: list[str] = []
    guards: list[_Guard] = []
    group_start: int | None = None
    group1: str | None = None
    pending: list[str] | None = None  # a lookahead waiting for the capture that follows it
    stacked: str | None = None

    def text() -> str:
        return "".join(parts)

    def at_segment_start() -> bool:
        t = text()
        return t == "" or t.endswith(".")

    for i, a in enumerate(atoms):
        rest = [x for x in atoms[i + 1:] if not isinstance(x, _Mark)]
        if isinstance(a, _Mark):
            if a.open:
                group_start = len(text())
            elif group_start is not None:
                group1 = text()[group_start:]
            continue
        if isinstance(a, _Look):
            if a.ahead and rest and isinstance(rest[0], (_Wild, _Int, _Alt)) and at_segment_start():
                pending = list(a.strings)
                continue
            if a.ahead and rest and isinstance(rest[0], _Lit):
                following = rest[0].text
                if any(following.startswith(s) or s.startswith(following) for s in a.strings):
                    raise _Unsupported("a lookahead in the middle of the pattern")
                continue  # cannot match what follows: vacuous
            raise _Unsupported("a lookaround in the middle of the pattern")
        if isinstance(a, _Lit):
            if pending is not None:
                raise _Unsupported("a lookahead before literal text")
            parts.append(a.text)
            continue
        whole = at_segment_start() and (not rest or (isinstance(rest[0], _Lit)
                                                     and rest[0].text.startswith(".")))
        if isinstance(a, _Alt):
            name = names.new("c")
            guards.append(_Guard(name, False, a.values))
            cap = "{" + name + "}"
        elif isinstance(a, _Int):
            name = names.new("i")
            cap = "{" + name + ":int}"
        else:  # _Wild
            if stack:
                if not whole:
                    raise _Unsupported("the stacked '*' is not a whole segment")
                if stacked is not None:
                    raise _Unsupported("two '*' in one converter pattern")
                name = stacked = names.new("e")
                cap = "{" + name + ":int}"
            elif whole and not rest:
                name = names.new("s")  # the rest of the key: a stem of one segment, tail carried
                cap = "{" + name + "}"
            elif whole:
                name = names.new("w")
                cap = "{" + name + "*}"
            else:
                raise _Unsupported("'.*' inside a segment (it could span dots)")
        if pending is not None:
            guards.append(_Guard(name, True, _ahead_globs(pending, after_dot=True)))
            pending = None
        captures.append(name)
        parts.append(cap)
    if pending is not None:
        ahead = (ahead or []) + pending
    mid = bool(raw_end) and raw_end[-1] in "_-"
    return _Source(text(), anchored, group1, captures, guards, behind, ahead, mid, stacked)


def _ahead_globs(strings: Iterable[str], *, after_dot: bool) -> tuple[str, ...]:
    """Globs on the next segment for a negative lookahead with these alternatives."""
    out: list[str] = []
    for s in strings:
        if not after_dot:
            if not s.startswith("."):
                continue  # the next character is a dot (or the end): this alternative never hits
            s = s[1:]
        elif s.startswith("."):
            continue
        if s == "":
            raise _Unsupported("a lookahead on the dot itself")
        head, dot, tail = s.partition(".")
        if dot and tail:
            raise _Unsupported(f"the lookahead (?!{s}) spans more than one segment")
        out.append(head if dot else head + "*")
    return tuple(dict.fromkeys(out))


_TARGET_OK = re.compile(r"[^{}\s\"\\]*\Z")


def _render_target(target: str, src: _Source) -> str:
    if re.search(r"\\[2-9]", target):
        raise _Unsupported(f"target {target!r} uses a backreference other than \\1")
    if "\\1" in target:
        if src.group1 is None:
            raise _Unsupported(f"target {target!r} refers to \\1 but the source has no group")
        out = target.replace("\\1", src.group1)
    else:
        out = target
    check = out
    for c in src.captures:
        check = check.replace("{" + c + ":int}", "").replace("{" + c + "*}", "")
        check = check.replace("{" + c + "}", "")
    if not _TARGET_OK.match(check):
        raise _Unsupported(f"target {target!r} holds characters a key pattern cannot")
    return out


@dataclass
class _Pair:
    """A source and target fragment with the prefix forms they are emitted in."""

    src: str
    dst: str
    forms: list[str]  # prefixes, each "" (root) or ending in "." / "{p*}" glue
    guards: list[_Guard]
    behind: list[str]
    prefix_capture: str | None


def _pair(src: _Source, target: str, names: _Names, scope: tuple[str, ...] | None) -> _Pair:
    """Normalize a source fragment and its target at segment boundaries, and list the forms."""
    s, t = src.text, _render_target(target, src)
    guards = list(src.guards)
    if s.startswith(".") != t.startswith(".") and s and t:
        raise _Unsupported("the source starts at a segment boundary but the target does not "
                           "(or the other way round)")
    if s.endswith("."):
        if not t.endswith("."):
            raise _Unsupported("the source ends at a dot but the target runs into the next "
                               "segment")
        s, t = s[:-1], t[:-1]
    elif s == "" and t.endswith("."):
        t = t[:-1]
    elif t.endswith(".") and s:
        raise _Unsupported("the target ends with a dot but the source does not")
    if src.mid_segment_end:
        name = names.new("r")
        s, t = s + "{" + name + "}", t + "{" + name + "}"
    if src.ahead is not None or s == "" or s == ".":
        name = names.new("n")
        joiner_s = "" if s in ("", ".") or s.endswith(".") else "."
        joiner_t = "" if t == "" or t.endswith(".") else "."
        s = (s if s != "." else ".") + joiner_s + "{" + name + "}"
        t = t + joiner_t + "{" + name + "}"
        if src.ahead is not None:
            after_dot = src.text == "" or src.text.endswith(".")
            globs = _ahead_globs(src.ahead, after_dot=after_dot)
            if globs:
                guards.append(_Guard(name, True, globs))
    if t == "" or t == ".":
        raise _Unsupported("the target is empty")
    # forms
    prefix_capture: str | None = None
    if src.anchored or src.text == "":
        forms = [""]
    elif s.startswith("."):
        prefix_capture = names.new("p")
        forms = ["{" + prefix_capture + "*}"]
    else:
        prefix_capture = names.new("p")
        forms = ["", "{" + prefix_capture + "*}."]
        if t.endswith("." + s):
            # the root form's result would meet the prefixed form again (transformers applies
            # the one regex once): below a prefix first
            forms.reverse()
    if scope is not None:
        forms = _scoped(forms, scope, src.anchored or src.text == "")
        if scope[0] == "" and scope[1] and (src.anchored or src.text == "") \
                and not s.startswith(scope[1] + ".") and not s.startswith("{"):
            forms.append("")  # a key without 'base.' is matched as it is
    return _Pair(s, t, forms, guards, src.behind, prefix_capture)


def _scoped(forms: list[str], scope: tuple[str, ...], anchored: bool) -> list[str]:
    """Prefix forms for a transform scoped to a sub-model (transformers' ``_scoped_match``: the
    key must start with ``base.scope.`` or ``scope.``; with scope "" every key matches)."""
    scope_prefix, base = scope
    if scope_prefix == "":
        if not anchored or not base:
            return forms  # '{p*}.' already covers 'base.{p*}.' and 'base.'
        # a key that starts with 'base.' is matched without it; any other key as it is
        return [f"{base}." + f for f in forms]
    else:
        heads = [f"{base}.{scope_prefix}.", f"{scope_prefix}."] if base else [f"{scope_prefix}."]
    return list(dict.fromkeys(h + f for h in dict.fromkeys(heads) for f in forms))


def _behind_guard(pair: _Pair, form: str) -> _Guard | None:
    """The lookbehind alternatives as an ``unless`` on the prefix capture, for one form."""
    if not pair.behind or pair.prefix_capture is None:
        return None
    cap = "{" + pair.prefix_capture + "*}"
    if cap not in form:
        return None  # the root form: nothing before the match
    glued = form.endswith(cap)  # '{p*}' + '.x': the text before the match is p
    globs = []
    for b in pair.behind:
        if glued:
            if b.endswith("."):
                continue
            globs.append("*" + b)
        else:
            if not b.endswith("."):
                continue
            globs.append("*" + b[:-1])
    return _Guard(pair.prefix_capture, True, tuple(dict.fromkeys(globs))) if globs else None


def _full(form: str, frag: str) -> str:
    return form + frag  # "" + "x", "{p*}." + "x", or "{p*}" + ".x"


# --- units: what one transformers transform becomes ---------------------------------------------


@dataclass
class _Rename:
    """A rename statement, kept apart so that guards can be added after an order check."""

    src: str
    dst: str
    guards: list[_Guard]
    prefix_capture: str | None

    def text(self) -> str:
        out = f"rename {_q(self.src)} -> {_q(self.dst)}"
        for g in self.guards:
            out += f"\n  {g.text()}"
        return out


@dataclass
class _Raw:
    body: str

    def text(self) -> str:
        return self.body


_Stmt = _Rename | _Raw


@dataclass
class _Unit:
    index: int
    item: str  # transformers' repr of the transform
    statements: list[_Stmt] = field(default_factory=list)
    examples: list[list[str]] = field(default_factory=list)  # per statement
    notes: list[str] = field(default_factory=list)
    reason: str | None = None  # set when the unit is not translated
    kind: str = "rename"
    no_expect: set[str] = field(default_factory=set)  # examples that do not round-trip
    check_failure: str | None = None
    # example key -> (text, replacement) in transformers' result, where its key renaming alone
    # cannot tell the target (the Ernie op sends each expert to one of its targets by position)
    retarget: dict[str, tuple[str, str]] = field(default_factory=dict)
    # config values the examples are traced with (``with config.n = 2`` on their expects)
    given: tuple[tuple[tuple[str, ...], int], ...] = ()


def _describe(t: Any) -> str:
    cls = type(t).__name__
    src = list(getattr(t, "_original_source_patterns", []))
    dst = list(getattr(t, "_original_target_patterns", []))
    text = f"{cls}({_short(src)} -> {_short(dst)}"
    if cls == "PrefixChange":
        text = (f"PrefixChange(add={t.prefix_to_add!r}, remove={t.prefix_to_remove!r}, "
                f"model_prefix={t.model_prefix!r}")
    ops = getattr(t, "operations", None)
    if ops:
        text += ", [" + ", ".join(_op_text(o) for o in ops) + "]"
    offset = getattr(t, "offset", None)
    if offset is not None and cls.endswith("IndexOffsetWeightRename"):
        text += f", offset={offset}"
    scope = getattr(t, "scope_prefix", None)
    if scope is not None:
        text += f", scope={scope!r}"
    return text + ")"


def _short(patterns: list[str]) -> str:
    return repr(patterns[0]) if len(patterns) == 1 else repr(patterns)


def _op_text(op: Any) -> str:
    args = {k: v for k, v in vars(op).items() if not k.endswith("_op")}
    inner = ", ".join(f"{k}={v!r}" for k, v in args.items())
    return f"{type(op).__name__}({inner})"


def _example_value(cap: str, kind: str, guards: list[_Guard]) -> str:
    where = [g for g in guards if g.capture == cap and not g.negate]
    if where:
        return where[0].values[0].replace("*", "")
    if kind == "int":
        return "1"
    if kind == "many":
        return "x.0"
    return "a0"


_CAP = re.compile(r"\{([A-Za-z_][A-Za-z0-9_]*)(\*|:int(?:<[^{}]*)?)?\}")


def _instantiate(pattern: str, guards: list[_Guard], tail: str) -> str:
    def sub(m: re.Match[str]) -> str:
        kind = "many" if m.group(2) == "*" else "int" if m.group(2) else "one"
        return _example_value(m.group(1), kind, guards)

    return _CAP.sub(sub, pattern) + tail


def _rename_statements(t: Any, names_factory: Callable[[], _Names], scope: tuple[str, ...] | None
                       ) -> tuple[list[_Stmt], list[list[str]], list[str]]:
    """Statements, example keys and notes for a renaming transform."""
    statements: list[_Stmt] = []
    examples: list[list[str]] = []
    notes: list[str] = []
    sources: list[str] = list(t.source_patterns)
    targets: list[str] = list(t.target_patterns)
    cls = type(t).__name__
    if cls == "GroupWeightRename":
        pairs = list(zip(sources, targets, strict=True))
        # applied at once in transformers: as passes, a pair whose target is another pair's
        # source must run after it
        pairs = _group_order(pairs)
        notes.append("GroupWeightRename renames its pairs at once, and only after its first "
                     "pattern matched a key (so that a converted checkpoint is left alone); here "
                     "the pairs run as ordered passes and a converted checkpoint is refused by "
                     "the name checks")
    else:
        if len(targets) != 1:
            raise _Unsupported("a renaming with several targets")
        if len(sources) > 1:
            raise _Unsupported(f"{len(sources)} source patterns renamed to one target: the "
                               "inverse could not tell which to restore")
        pairs = [(sources[0], targets[0])]
    for source, target in pairs:
        raw = source.replace("*.", ".*\\.")
        variants = _linear(_alt_seq(_RegexParser(raw).parse()))
        if len(variants) > 1 and "\\1" not in target:
            raise _Unsupported("alternative source names renamed to one target: the inverse "
                               "could not tell which to restore")
        for atoms in variants:
            names = names_factory()
            src = _render_source(atoms, names, stack=False, raw_end=raw)
            pair = _pair(src, target, names, scope)
            _same_captures(pair.src, pair.dst)
            for form in pair.forms:
                guards = list(pair.guards)
                g = _behind_guard(pair, form)
                if g is not None:
                    guards.append(g)
                # a side that is one {x*} capture (PrefixChange at the root) is a rename of
                # every key: the direction whose result it is then needs every key matched
                # (Program.catch_all), which is what transformers' prefix change means
                s, d = _full(form, pair.src), _full(form, pair.dst)
                cap = pair.prefix_capture if pair.prefix_capture and pair.prefix_capture in s \
                    else None
                statements.append(_Rename(s, d, guards, cap))
                examples.append([_instantiate(s, guards, ".weight")])
    return statements, examples, notes


def _shift_index(statements: list[_Stmt], offset: int) -> None:
    """Inkling2IndexOffsetWeightRename: the target's index is the source's plus ``offset``, an
    expression capture on the target side (``{i+1}``; its inverse solves for ``i``)."""
    for st in statements:
        assert isinstance(st, _Rename)
        ints = [m for m in _CAP.finditer(st.dst) if m.group(2) == ":int"]
        if len(ints) != 1:
            raise _Unsupported(f"an index offset on a target with {len(ints)} integer captures")
        name = ints[0].group(1)
        shifted = "{" + name + (f"+{offset}" if offset >= 0 else f"-{-offset}") + "}"
        st.dst = st.dst[: ints[0].start()] + shifted + st.dst[ints[0].end():]


# LayerPairCollapse: its class pattern, and the renames it makes of each block of a layer pair
_LAYER_PAIR = r"layers\.(\d+)\.(mixer|attn_alpha|mlp_alpha)(?=\.|$)"
_LAYER_PAIR_RENAMES = (("{2*i}.mixer", "{i:int}.self_attn"), ("{2*i+1}.mixer", "{i:int}.mlp"),
                       ("{2*i}.attn_alpha", "{i:int}.lambda_1"),
                       ("{2*i+1}.mlp_alpha", "{i:int}.lambda_2"))


def _layer_pair_statements(t: Any) -> tuple[list[_Stmt], list[list[str]], list[str]]:
    """LayerPairCollapse: hub blocks ``layers.{2i}`` (attention) and ``layers.{2i+1}`` (mlp)
    become layer ``i``, named by the parity; one rename per block kind, at the root and below
    a prefix (transformers searches the key anywhere)."""
    found = getattr(getattr(type(t), "pattern", None), "pattern", None)
    if found != _LAYER_PAIR:
        raise _Unsupported(f"LayerPairCollapse with a pattern the importer does not know: "
                           f"{found!r}")
    statements: list[_Stmt] = []
    examples: list[list[str]] = []
    for form, cap in (("", None), ("{p*}.", "p")):
        for src, dst in _LAYER_PAIR_RENAMES:
            statements.append(_Rename(f"{form}layers.{src}", f"{form}layers.{dst}", [], cap))
            block = 3 if "+1" in src else 2
            examples.append([f"{'x.0.' if form else ''}layers.{block}."
                             f"{src.split('.', 1)[1]}.weight"])
    notes = [
        "transformers also renames attn_alpha on an mlp block and mlp_alpha on an attention "
        "block (to the same lambda as the other parity); the hub holds each on its own parity, "
        "and only that one is renamed here, so that the renames stay a bijection",
        "transformers' reverse of LayerPairCollapse is itself, which matches no in-memory name "
        "(save_pretrained keeps the collapsed layers); the inverse here writes the layer pairs "
        "of the hub layout back"]
    return statements, examples, notes


def _alt_seq(alts: tuple[tuple[_RNode, ...], ...]) -> tuple[_RNode, ...]:
    if len(alts) == 1:
        return alts[0]
    return (_Grp("noncap", alts),)


def _group_order(pairs: list[tuple[str, str]]) -> list[tuple[str, str]]:
    """Order renames that transformers applies at once so that, as passes, none renames another's
    result: a pair whose source is another pair's target goes first."""
    def norm(p: str) -> str:
        return re.sub(r"\([^)]*\)", r"\\1", p, count=1).replace("\\.", ".")

    out: list[tuple[str, str]] = []
    left = [(norm(s), norm(t), s, t) for s, t in pairs]
    while left:
        for i, (_, nt, _, _) in enumerate(left):
            # run a pair first when no other pair renames its result again
            if not any(o_ns == nt for j, (o_ns, _, _, _) in enumerate(left) if j != i):
                _, _, rs, rt = left.pop(i)
                out.append((rs, rt))
                break
        else:
            raise _Unsupported("GroupWeightRename pairs form a cycle")
    return out


def _same_captures(s: str, d: str) -> None:
    sc = {m.group(1) for m in _CAP.finditer(s)}
    dc = {m.group(1) for m in _CAP.finditer(d)}
    if sc != dc:
        lost = sorted(sc - dc)
        raise _Unsupported(
            "the source matches varying text that the target drops "
            f"({', '.join('{' + c + '}' for c in lost)}): many keys would get one name")


# --- converters ----------------------------------------------------------------------------------


_QKV_SIZES = {
    "q_proj": "config.num_attention_heads * config.head_dim",
    "k_proj": "config.num_key_value_heads * config.head_dim",
    "v_proj": "config.num_key_value_heads * config.head_dim",
}


def _naming(stem: str, *, stacked_param: bool, flat_bias: bool) -> tuple[str, str, str]:
    """(stem, naming, how it was decided) for a converter endpoint."""
    last = stem.rsplit(".", 1)[-1]
    if last == "weight" and "." in stem:
        return stem[: -len(".weight")], "module", ""
    if last == "bias" and "." in stem:
        return stem[: -len(".bias")], "module", ""
    if last.endswith("_weight") and last != "_weight":
        return stem[: -len("_weight")], "flat", ""
    if last.endswith("_bias") and flat_bias:
        return stem[: -len("_bias")], "flat", ""
    if stacked_param or "experts" in stem.split(".") or last.endswith(("_bias", "embedding")):
        return stem, "param", "inferred"
    return stem, "module", "inferred"


def _ops_text(t: Any, n_src: int, targets: list[str], source_patterns: list[str],
              stack_cap: str | None) -> tuple[list[str], list[str], str | None]:
    """convlens ops for a converter's op list: (ops, notes, transpose axes (src) or None)."""
    ops: list[str] = []
    notes: list[str] = []
    streams = n_src
    labels: list[str] = list(source_patterns)  # what transformers keys the stream dict by
    src_axes: str | None = None
    operations = list(t.operations)
    i = 0
    while i < len(operations):
        op = operations[i]
        name = type(op).__name__
        nxt = type(operations[i + 1]).__name__ if i + 1 < len(operations) else None
        if name == "MergeModulelist":
            if stack_cap is None:
                raise _Unsupported("MergeModulelist without a '*' to stack over")
            ops.append(f"stack({stack_cap}, {op.dim})")
        elif name == "SplitModulelist":
            raise _Unsupported("SplitModulelist in a load-time converter")
        elif name == "Concatenate":
            if op.num_shards_attribute is not None:
                raise _Unsupported(
                    f"Concatenate over a config-sized number of shards "
                    f"(num_shards_attribute={op.num_shards_attribute!r}): a family of parts "
                    "joined along an existing axis needs a concat over a capture")
            if streams > 1:
                ops.append(f"concat({op.dim})")
                notes.append("Concatenate's reverse in transformers is Chunk (equal parts); "
                             "convlens concats equal parts only and refuses unequal ones")
            streams, labels = 1, targets[:1]
        elif name == "Chunk":
            if op.num_shards_attribute is not None:
                raise _Unsupported(f"Chunk into a config-sized number of targets "
                                   f"(num_shards_attribute={op.num_shards_attribute!r})")
            if streams != 1:
                raise _Unsupported("Chunk of several parts")
            ops.append(f"split({op.dim}, parts={len(targets)})")
            notes.append("Chunk is torch.chunk (uneven when the size does not divide); "
                         "split refuses a size that does not divide")
            streams, labels = len(targets), list(targets)
        elif name == "Split":
            last = [tt.rstrip(".").rsplit(".", 1)[-1] for tt in targets]
            last = [x if x not in ("weight", "bias") else
                    tt.rstrip(".").rsplit(".", 2)[-2] for x, tt in zip(last, targets, strict=True)]
            if streams != 1 or not all(x in _QKV_SIZES for x in last):
                raise _Unsupported(
                    "Split sizes come from the model's parameter shapes; no config expression "
                    f"is known for the targets {targets}")
            sizes = ", ".join(_QKV_SIZES[x] for x in last)
            ops.append(f"split({op.dim}, sizes=[{sizes}])")
            notes.append("Split sizes read the model's parameters in transformers; here they "
                         "are config.num_attention_heads / num_key_value_heads x head_dim")
            streams, labels = len(targets), list(targets)
        elif name == "Interleave":
            if streams != 1:
                raise _Unsupported("Interleave of several parts")
            if op.inverse:
                ops += [f"split({op.dim}, parts=2)", f"interleave({op.dim})"]
            else:
                ops.append(f"deinterleave({op.dim}, parts=2)")
                if (nxt == "Chunk" and operations[i + 1].dim == op.dim and len(targets) == 2
                        and operations[i + 1].num_shards_attribute is None):
                    i += 1  # de-interleaved rows chunked in two = the two parts
                    streams, labels = 2, list(targets)
                    i += 1
                    continue
                ops.append(f"concat({op.dim})")
            streams = 1
        elif name == "Transpose":
            rank = max(op.dim0, op.dim1) + 1
            if rank < 2:
                rank = 2
            default = ["out", "in"] if rank == 2 else ["e", "out", "in"][-rank:] if rank == 3 \
                else None
            if default is None:
                raise _Unsupported(f"Transpose({op.dim0}, {op.dim1}) of a tensor of rank > 3")
            permuted = list(default)
            permuted[op.dim0], permuted[op.dim1] = permuted[op.dim1], permuted[op.dim0]
            if src_axes is not None or ops:
                raise _Unsupported("Transpose after other ops")
            src_axes = ", ".join(permuted)
            ops.append(f"transpose({op.dim0}, {op.dim1})")
            if op.check_dims:
                notes.append("Transpose(check_dims=True) transposes only when the shapes differ "
                             "(a square layout loads untransposed, and the save side never "
                             "transposes); here the transpose is unconditional both ways")
        elif name == "PermuteForRope":
            sub = op.subconfig_key
            heads = f"config.{sub}.num_attention_heads" if sub else "config.num_attention_heads"
            wanted = op.permute_layer_names
            on = [k for k, lab in enumerate(labels)
                  if wanted is None or any(w in lab for w in wanted)]
            if on:
                text = f"rope_permute(heads={heads})"
                if len(on) < streams:
                    text += " on [" + ", ".join(str(k) for k in on) + "]"
                ops.append(text)
                notes.append("PermuteForRope falls back to the whole config without "
                             f"{sub or 'a sub-config'} and to 1 head without "
                             "num_attention_heads; here the field must exist")
        elif name == "Conv3dToLinear":
            ks = ", ".join(str(k) for k in op.kernel_size)
            ops.append(f"flatten(1, sizes=[{op.in_channels}, {ks}])")
            notes.append("Conv3dToLinear passes 2-D tensors through; flatten requires the "
                         "5-D kernel")
        elif name == "ErnieFuseAndSplitTextVisionExperts":
            raise _Unsupported("handled apart")  # pragma: no cover - see _ernie
        else:
            raise _Unsupported(f"{name} has no convlens op (a custom tensor operation)")
        i += 1
    if streams != len(targets):
        raise _Unsupported(f"the ops leave {streams} part(s) for {len(targets)} target(s)")
    return ops, notes, src_axes


def _converter_statements(t: Any, names_factory: Callable[[], _Names],
                          scope: tuple[str, ...] | None, siblings: set[str],
                          naming_of: Callable[[str, str], str | None], unit: _Unit
                          ) -> tuple[list[_Stmt], list[list[str]], list[str], str]:
    op_names = [type(o).__name__ for o in t.operations]
    stack = any(n in ("MergeModulelist", "ErnieFuseAndSplitTextVisionExperts") for n in op_names)
    sources: list[_Source] = []
    src_names: list[_Names] = []
    for source in t.source_patterns:
        raw = source.replace("*.", ".*\\.")
        variants = _linear(_alt_seq(_RegexParser(raw).parse()))
        if len(variants) != 1:
            raise _Unsupported("a converter source with alternatives")
        names = names_factory()  # fresh per source: parallel sources get the same names
        src = _render_source(variants[0], names, stack=stack, raw_end=raw)
        if src.guards or src.behind or src.ahead is not None or src.mid_segment_end:
            raise _Unsupported("a converter source with lookarounds or alternations")
        sources.append(src)
        src_names.append(names)
    caps = [tuple(s.captures) for s in sources]
    if len(set(caps)) != 1:
        raise _Unsupported("converter sources capture different things")
    stack_cap = sources[0].stacked
    if stack and stack_cap is None:
        raise _Unsupported("a stacking converter without '*' in its sources")
    if not stack and any(s.stacked for s in sources):
        raise _Unsupported("a '*' in a converter that does not stack")
    anchored = {s.anchored for s in sources}
    starts = {s.text.startswith(".") for s in sources}
    if len(anchored) != 1 or len(starts) != 1:
        raise _Unsupported("converter sources anchored differently")
    # boundaries: every source and target as a stem
    pairs = [_pair(s, t.target_patterns[0], copy.deepcopy(n), scope)
             for s, n in zip(sources, src_names, strict=True)]
    forms = pairs[0].forms
    if any(p.forms != forms for p in pairs):
        raise _Unsupported("converter sources anchored differently")
    src_frags = [p.src for p in pairs]
    dst_frags = [_pair(sources[0], tt, copy.deepcopy(src_names[0]), scope).dst
                 for tt in t.target_patterns]
    if any(p.guards for p in pairs):
        raise _Unsupported("a converter source with a lookahead")
    statements: list[_Stmt] = []
    examples: list[list[str]] = []
    notes: list[str] = []
    is_ernie = "ErnieFuseAndSplitTextVisionExperts" in op_names
    for form in forms:
        flat_bias = all(re.sub(r"_bias$", "_weight", str(x)) in siblings
                        for x in t.source_patterns)
        src_stems = [_naming(_full(form, f), stacked_param=False, flat_bias=flat_bias)
                     for f in src_frags]
        dst_stems = [_naming(_full(form, f), stacked_param=stack, flat_bias=flat_bias)
                     for f in dst_frags]
        if src_stems[0][1] in ("flat", "param"):
            # a bare target of a flat or param source is the weight itself
            dst_stems = [(st, "param", "") if how else (st, nm, how)
                         for st, nm, how in dst_stems]
        src_stems = [_resolve(x, naming_of) for x in src_stems]
        dst_stems = [_resolve(x, naming_of) for x in dst_stems]
        if len({n for _, n, _ in src_stems}) != 1 or len({n for _, n, _ in dst_stems}) != 1:
            raise _Unsupported("the sources (or targets) of one converter name their tensors "
                               "differently (module .weight vs a bare parameter)")
        for stem, naming, how in src_stems + dst_stems:
            if how and not (stack and naming == "param"):
                notes.append(f"{stem!r} is read as {naming} naming (transformers' pattern does "
                             "not say whether it is a module or a parameter)")
        tail = {"module": ".weight", "param": "", "flat": "_weight"}[src_stems[0][1]]
        last_src = str(t.source_patterns[0]).replace("\\", "")
        if src_stems[0][1] != "param" and last_src.endswith(("bias", "bias.")):
            tail = ".bias" if src_stems[0][1] == "module" else "_bias"
        if is_ernie:
            st, keys, note = _ernie(t, src_stems, dst_stems, stack_cap, tail, unit)
            statements += [_Raw(x) for x in st]
            examples += [[k] for k in keys]
            notes.append(note)
            continue
        ops, op_notes, src_axes = _ops_text(t, len(sources), list(t.target_patterns),
                                            list(t.source_patterns), stack_cap)
        notes += op_notes
        if not ops:
            raise _Unsupported("no tensor op is left (a converter that only renames)")
        n_s, n_d = len(src_stems), len(dst_stems)
        kind = "fuse" if n_d == 1 and (n_s > 1 or stack_cap) else "map" if n_d == 1 \
            else "split" if n_s == 1 else None
        if kind is None:
            raise _Unsupported("a converter from several sources to several targets")
        src_ep = ", ".join(_q(s) for s, _, _ in src_stems) + _naming_text(src_stems[0][1])
        dst_ep = ", ".join(_q(s) for s, _, _ in dst_stems) + _naming_text(dst_stems[0][1])
        if src_axes is not None:
            rank = len(src_axes.split(", "))
            src_ep += f" axes ({src_axes})"
            dst_ep += " axes (" + ("out, in" if rank == 2 else "e, out, in") + ")"
        text = f"{kind} {src_ep}\n  -> {dst_ep}\n  by {', '.join(ops)}"
        statements.append(_Raw(text))
        examples.append([_instantiate(src_stems[0][0], [], tail)])
    return statements, examples, list(dict.fromkeys(notes)), "tensor"


def _resolve(x: tuple[str, str, str], naming_of: Callable[[str, str], str | None]
             ) -> tuple[str, str, str]:
    stem, naming, how = x
    if how:
        found = naming_of(stem, naming)
        if found is not None:
            return stem, found, ""
    return x


def _naming_text(naming: str) -> str:
    return "" if naming == "module" else f" naming {naming}"


# The size of each group the Ernie op cuts the expert list into: in ernie4_5_vl_moe the text and
# the vision MoE both hold the text config's moe_num_experts experts (Ernie4_5_VLMoeMoeBlock).
_ERNIE_GROUP = ("config", "text_config", "moe_num_experts")
_ERNIE_EXAMPLE_GROUP = 2  # the group size the example keys are traced with


def _ernie(t: Any, src_stems: list[tuple[str, str, str]], dst_stems: list[tuple[str, str, str]],
           stack_cap: str | None, tail: str, unit: _Unit) -> tuple[list[str], list[str], str]:
    """ErnieFuseAndSplitTextVisionExperts: the expert list of each source is cut into len(targets)
    contiguous groups, each stacked, and the sources concatenated per group. That is one fuse per
    target over its group of experts: the first ``{e:int<N}``, the next ``{e+N}`` (N experts a
    group, from the config). Returns the statements, one example key each (checked against
    transformers' own op, which says which target an expert goes to) and a note."""
    op = next(o for o in t.operations if type(o).__name__ == "ErnieFuseAndSplitTextVisionExperts")
    assert stack_cap is not None
    if len(dst_stems) != 2:
        raise _Unsupported(f"the Ernie op into {len(dst_stems)} groups (a middle group needs a "
                           "bound on an expression capture)")
    size = ".".join(_ERNIE_GROUP)
    plain = "{" + stack_cap + ":int}"
    forms = ["{" + stack_cap + ":int<" + size + "}", "{" + stack_cap + "+" + size + "}"]
    ops = [f"stack({stack_cap}, {op.stack_dim})"]
    if len(src_stems) > 1:
        ops.append(f"concat({op.concat_dim})")
    n = _ERNIE_EXAMPLE_GROUP
    groups = _ernie_groups(op, len(src_stems), [d for d, _, _ in dst_stems], 2 * n)
    statements, keys = [], []
    for k, ((dst, naming, _), form) in enumerate(zip(dst_stems, forms, strict=True)):
        srcs = [s.replace(plain, form) for s, _, _ in src_stems]
        src_ep = ", ".join(_q(s) for s in srcs) + _naming_text(src_stems[0][1])
        statements.append(f"fuse {src_ep}\n  -> {_q(dst)}{_naming_text(naming)}\n"
                          f"  by {', '.join(ops)}")
        index = k * n + 1  # the second expert of the group
        key = _instantiate(src_stems[0][0].replace(plain, str(index)), [], tail)
        keys.append(key)
        first = t.target_patterns[0]
        mine = t.target_patterns[groups[index]]
        if mine != first:
            unit.retarget[key] = (first, mine)
    unit.given = ((_ERNIE_GROUP, n),)
    note = (f"ErnieFuseAndSplitTextVisionExperts cuts the expert list into {len(dst_stems)} "
            f"contiguous groups of ceil(E / {len(dst_stems)}) experts; here each group holds "
            f"{size} experts (the text and the vision MoE both have that many), so a "
            f"checkpoint must hold exactly {len(dst_stems)} x {size}")
    return statements, keys, note


def _ernie_groups(op: Any, n_sources: int, targets: list[str], experts: int) -> list[int]:
    """Which target transformers' own op sends each expert to (by its values)."""
    import torch

    sources = [f"s{j}" for j in range(n_sources)]
    names = [f"t{k}" for k in range(len(targets))]
    inputs = {s: [torch.full((1, 1), float(e)) for e in range(experts)] for s in sources}
    out = op.convert(inputs, source_patterns=sources, target_patterns=names, config=None)
    where = [-1] * experts
    for k, name in enumerate(names):
        for value in out[name].flatten().tolist():
            where[int(value)] = k
    return where


# --- the registry ---------------------------------------------------------------------------------


def _transformers() -> Any:
    import transformers

    return transformers


def registry() -> dict[str, list[Any]]:
    """transformers' conversion registry: key (model type or class name) -> transforms (the
    cached registry itself, including user-registered entries: do not modify)."""
    import importlib

    cm: Any = importlib.import_module("transformers.conversion_mapping")
    cm.get_checkpoint_conversion_mapping("llava")  # builds the cache
    built: dict[str, list[Any]] = cm._checkpoint_conversion_mapping_cache
    return built


def _conversion_name(name: str) -> str:
    n = re.sub(r"[^A-Za-z0-9_]", "_", name)
    return n if re.match(r"[A-Za-z_]", n) else "_" + n


def _header(name: str, keys: Sequence[str], source: str) -> list[str]:
    version = getattr(_transformers(), "__version__", "?")
    lines = [
        f"# Imported by convlens import-transformers from transformers {version}: {source}.",
        "# Conventions: patterns match whole dot-separated segments (transformers' unanchored",
        "# regexes also match inside a segment, and an unescaped '.' matches any character); a",
        "# stem carries its leaves and known suffix siblings (_weight_scale, ...) where",
        "# transformers' (?!\\w) guard stops at '_'. Renames run as passes in order, then the",
        "# tensor rules, as transformers applies its renamings before its converter.",
        f"conversion {_conversion_name(name)}",
    ]
    import textwrap

    types = [k for k in keys if not k[:1].isupper()]
    classes = [k for k in keys if k[:1].isupper()]
    for kind, names in (("model_type", types), ("architecture", classes)):
        if names:
            lines += textwrap.wrap(f"for {kind} " + ", ".join(names), 96,
                                   initial_indent="  ", subsequent_indent="    ",
                                   break_on_hyphens=False)
    return lines


def translate_transforms(name: str, transforms: Sequence[Any], *, keys: Sequence[str] = (),
                         source: str = "", validate: bool = True, schemes: bool = False,
                         model_keys: Iterable[str] | None = None) -> ImportResult:
    """``.conv`` text for a list of transformers transforms (as the registry or
    ``get_model_conversion_mapping`` gives them).

    ``validate``: compile, compare every rule with transformers on an example key (written as
    ``expect`` lines) and run ``check_program``; whatever fails is left out and reported.
    ``schemes``: also check on every quantized scheme (what ``convlens check`` runs).
    ``model_keys``: a model's state dict keys, to tell module from parameter naming."""
    transforms = list(transforms)
    keyset = set(model_keys) if model_keys is not None else None
    units = _units(name, transforms, keyset)
    result = _assemble(name, keys or [name], source or f"conversion mapping {name!r}", units,
                       transforms, validate=validate, schemes=schemes)
    return result


def _naming_lookup(keyset: set[str] | None) -> Callable[[str, str], str | None]:
    def lookup(stem: str, guess: str) -> str | None:
        if keyset is None:
            return None
        rx = re.compile("^" + _CAP.sub(lambda m: "[^.]+(?:\\.[^.]+)*?"
                                       if m.group(2) == "*" else "[^.]+", re.escape(stem)
                                       .replace("\\{", "{").replace("\\}", "}")
                                       .replace("\\*", "*").replace("\\:", ":"))
                        + "(\\..+)?$")
        for k in keyset:
            m = rx.match(k)
            if m:
                return "param" if m.group(1) is None else "module"
        return None

    return lookup


def _units(name: str, transforms: list[Any], keyset: set[str] | None) -> list[_Unit]:
    renames: list[_Unit] = []
    tensors: list[_Unit] = []
    siblings = {p for t in transforms if type(t).__name__ == "WeightConverter"
                for p in t.source_patterns}
    naming_of = _naming_lookup(keyset)
    for i, t in enumerate(transforms):
        unit = _Unit(i, _describe(t))
        scope: tuple[str, ...] | None = None
        if getattr(t, "scope_prefix", None) is not None:
            scope = (t.scope_prefix, t.base_model_prefix or "")
        cls = type(t).__name__
        is_converter = hasattr(t, "operations")
        try:
            if getattr(t, "quantization_operation", None) is not None:
                raise _Unsupported("carries a quantization operation")
            if cls == "LayerPairCollapse":
                st, ex, notes = _layer_pair_statements(t)
            elif cls.endswith("IndexOffsetWeightRename"):
                st, ex, notes = _rename_statements(t, _Names, scope)
                _shift_index(st, t.offset)
            elif is_converter:
                st, ex, notes, kind = _converter_statements(
                    t, _Names, scope, siblings, naming_of, unit)
                unit.kind = kind
            elif cls in ("WeightRenaming", "PrefixChange", "GroupWeightRename"):
                st, ex, notes = _rename_statements(t, _Names, scope)
                if cls == "PrefixChange":
                    notes.append("transformers drops PrefixChange on save when the model was not "
                                 "loaded from a file (no record that the prefix existed); here "
                                 "the inverse always restores it")
            else:
                raise _Unsupported(f"{cls} is not a transform the importer knows")
            unit.statements, unit.examples, unit.notes = st, ex, notes
        except _Unsupported as exc:
            unit.reason = str(exc)
        if is_converter and unit.reason is None:
            same = next((o for o in tensors if o.reason is None and
                         [x.text() for x in o.statements] == [x.text() for x in unit.statements]),
                        None)
            if same is not None:  # the .bias converter of a .weight one: one convlens rule
                same.examples += unit.examples
                unit.statements, unit.examples = [], []
                unit.notes = [f"the same convlens rule as {same.item} (a stem's weight and bias "
                              "convert together)"]
        (tensors if is_converter else renames).append(unit)
    # transformers: all renamings (chained, in order), then one converter
    return renames + tensors


# --- assembling, validating --------------------------------------------------------------------


_Given = tuple[tuple[tuple[str, ...], int], ...]
_Expect = tuple[str, str, _Given]


def _render(name: str, keys: Sequence[str], source: str, units: list[_Unit],
            expects: list[_Expect]) -> tuple[str, dict[int, tuple[int, int]]]:
    """The text, and a map line -> (unit index, statement index)."""
    lines = _header(name, keys, source)
    owner: dict[int, tuple[int, int]] = {}
    for u in units:
        lines.append("")
        lines.append(f"# transformers: {u.item}")
        if u.reason is not None:
            lines += _wrap(f"UNTRANSLATED: {u.reason}")
            continue
        for note in u.notes:
            lines += _wrap(f"note: {note}")
        if u.check_failure is not None:
            lines += _wrap(f"CHECK FAILS: {u.check_failure}")
        for k, st in enumerate(u.statements):
            for ln in st.text().split("\n"):
                lines.append(ln)
                owner[len(lines)] = (u.index, k)
    if expects:
        lines.append("")
        lines.append("# transformers' own transforms map these keys the same way")
        for a, b, given in expects:
            lines.append(f"expect {_q(a)}")
            lines.append(f"    -> {_q(b)}")
            if given:
                lines.append("    with " + ", ".join(f"{'.'.join(path)} = {value}"
                                                   for path, value in given))
    return "\n".join(lines) + "\n", owner


def _wrap(text: str, width: int = 98) -> list[str]:
    import textwrap

    return ["# " + ln for ln in textwrap.wrap(text, width - 2)] or ["#"]


def _errors_of(exc: ConvlensError) -> list[ConvlensError]:
    return list(exc.errors) if isinstance(exc, ErrorGroup) else [exc]


def _line_of(e: ConvlensError) -> int | None:
    if e.rule:
        m = re.match(r".*?:(\d+) ", e.rule)
        if m:
            return int(m.group(1))
    return e.span.line if e.span is not None else None


def _first_line(e: ConvlensError) -> str:
    return (e.message or str(e)).splitlines()[0]


class _Transformers:
    """transformers' own renaming of single keys, on one copy of the transforms."""

    def __init__(self, transforms: list[Any]) -> None:
        from transformers.core_model_loading import WeightConverter

        fresh = copy.deepcopy(transforms)
        for t in fresh:
            if type(t).__name__ == "GroupWeightRename":
                t._active = True  # a hub checkpoint holds the guard pattern
        self.indexed = list(enumerate(fresh))
        self.renamings = [(i, t) for i, t in self.indexed if not isinstance(t, WeightConverter)]
        self.converters = [(i, t) for i, t in self.indexed if isinstance(t, WeightConverter)]
        self.cache: dict[str, tuple[str, frozenset[int]]] = {}

    def revert(self, key: str) -> str:
        """transformers' save-side renaming of one key (the reversed transforms, as after a load
        from a hub file: PrefixChanges included)."""
        from transformers.core_model_loading import WeightConverter, rename_source_key

        if not hasattr(self, "_reverse"):
            rev = []
            for _, t in reversed(self.indexed):
                try:
                    rev.append(t.reverse_transform())
                except Exception:  # transformers' own limits: no revert for it
                    continue
            self._reverse = rev
        renamings = [t for t in self._reverse if not isinstance(t, WeightConverter)]
        converters = [t for t in self._reverse if isinstance(t, WeightConverter)]
        return str(rename_source_key(key, renamings, converters, reverse=True)[0])

    def rename(self, key: str) -> tuple[str, frozenset[int]]:
        """The renamed key and the indices of the transforms that fired."""
        if key in self.cache:
            return self.cache[key]
        fired: set[int] = set()
        current = key
        for i, t in self.renamings:
            current, hit = t.rename_source_key(current)
            if hit is not None:
                fired.add(i)
        for i, t in self.converters:
            renamed, hit = t.rename_source_key(current)
            if hit is not None:
                fired.add(i)
                current = renamed
                break
        out = (str(current), frozenset(fired))
        self.cache[key] = out
        return out


def _assemble(name: str, keys: Sequence[str], source: str, units: list[_Unit],
              transforms: list[Any], *, validate: bool, schemes: bool) -> ImportResult:
    from convlens.api import compile_text

    path = f"<import {name}>"
    result = ImportResult(name, "")
    expects: list[_Expect] = []
    oracle = _Transformers(transforms) if validate else None
    by_index = {u.index: u for u in units}
    text = ""
    for _round in range(4 * len(units) + 4):
        text, owner = _render(name, keys, source, units, [])
        if oracle is None:
            break
        try:
            program = compile_text(text, path)
        except ConvlensError as exc:
            if not _fix_compile_errors(_errors_of(exc), owner, by_index):
                result.untranslatable.append(Untranslatable(name, "<file>", str(exc)))
                break
            continue
        if _compare_examples(units, program, oracle, owner, by_index):
            continue
        expects = _expects(units, oracle)
        text, owner = _render(name, keys, source, units, expects)
        try:
            program = compile_text(text, path)
        except ConvlensError as exc:  # pragma: no cover - the expects were traced above
            result.untranslatable.append(Untranslatable(name, "<file>", str(exc)))
            break
        report = _check(program, schemes)
        if report.ok:
            result.checked = True
            break
        # The rules rename as transformers does (their examples agree), yet convlens check
        # refuses the program: typically transformers accepts two hub layouts for one memory
        # layout (a base-model and a composite checkpoint), which a checked conversion cannot.
        # The rules stay; the failure is reported on the rule it names, or on the file.
        for e in report.errors:
            hit = owner.get(_line_of(e) or -1)
            unit = by_index[hit[0]] if hit is not None else None
            message = (f"convlens check fails (the rule is kept: it renames its examples as "
                       f"transformers does): {_first_line(e)}")
            if unit is not None:
                unit.check_failure = message
            else:
                result.untranslatable.append(Untranslatable(
                    name, "<file>", f"convlens check fails: {_first_line(e)}"))
        text, owner = _render(name, keys, source, units, expects)
        break
    result.text = text
    result.expects = len(expects)
    for u in units:
        if u.reason is not None:
            result.untranslatable.append(Untranslatable(name, u.item, u.reason))
        elif u.check_failure is not None:
            result.untranslatable.append(Untranslatable(name, u.item, u.check_failure))
            result.rules += len(u.statements)
        else:
            result.rules += len(u.statements)
            result.notes += [f"{u.item}: {n}" for n in u.notes]
    return result


_SHADOW = re.compile(r"'(?P<b>[^']*)' \(line (?P<bl>\d+)\) matches stems that the earlier rule at "
                     r"line (?P<al>\d+) \('(?P<a>[^']*)'\) already converts")


def _fix_compile_errors(errors: list[ConvlensError], owner: dict[int, tuple[int, int]],
                        by_index: dict[int, _Unit]) -> bool:
    """Resolve what the compiler refuses; True if anything changed.

    A later rename whose stems an earlier rename converts first (transformers chains them the
    same way, so the later one never sees those keys) gets an ``unless`` guard that says so;
    anything else leaves its unit out with the compiler's message."""
    changed = False
    for e in errors:
        m = _SHADOW.search(e.message)
        line = int(m.group("bl")) if m else _line_of(e)
        hit = owner.get(line or -1)
        if hit is None:
            continue
        unit = by_index[hit[0]]
        if unit.reason is not None:
            continue
        stmt = unit.statements[hit[1]]
        if m and isinstance(stmt, _Rename) and stmt.prefix_capture is not None:
            globs = _shadow_glob(stmt, m.group("a"))
            g = next((g for g in stmt.guards
                      if g.capture == stmt.prefix_capture and g.negate), None)
            if globs and not (g is not None and set(globs) <= set(g.values)):
                if g is None:
                    stmt.guards.append(_Guard(stmt.prefix_capture, True, tuple(globs)))
                else:
                    g.values = tuple(dict.fromkeys((*g.values, *globs)))
                note = ("an earlier rule converts some of these keys first (transformers "
                        "chains its renamings the same way): the guard on the prefix says so")
                if note not in unit.notes:
                    unit.notes.append(note)
                changed = True
                continue
        unit.reason = f"does not compile: {_first_line(e)}"
        changed = True
    return changed


def _shadow_glob(stmt: _Rename, earlier: str) -> list[str] | None:
    """Globs on ``stmt``'s prefix capture that exclude the stems ``earlier`` takes first."""
    cap = stmt.prefix_capture
    head = "{" + str(cap) + "*}."
    if not stmt.src.startswith(head):
        return None
    rest = stmt.src[len(head):]
    if earlier == rest:
        # the root form of the same regex: a key that starts with its literal head matches there
        # first (the leftmost match in transformers)
        lead = rest.split("{", 1)[0]
        if not lead.endswith(".") or len(lead) < 2:
            return None
        return [lead[:-1], lead + "*"]
    if not earlier.endswith("." + rest):
        return None
    before = earlier[: -len(rest) - 1]
    m = _CAP.match(before)
    if m and m.group(2) == "*" and before[m.end():m.end() + 1] == ".":
        lit = before[m.end() + 1:]
        return None if "{" in lit else ["*." + lit]
    return None if "{" in before else [before]


def _fired_units(trace: Any, owner: dict[int, tuple[int, int]]) -> list[int]:
    out: list[int] = []
    for step in trace.steps:
        hit = owner.get(step.rule.span.line)
        if hit is not None and hit[0] not in out:
            out.append(hit[0])
    return out


def _compare_examples(units: list[_Unit], program: Any, oracle: _Transformers,
                      owner: dict[int, tuple[int, int]], by_index: dict[int, _Unit]) -> bool:
    """Leave out the first unit that makes an example key go elsewhere than transformers sends
    it, or not come back; True if one was left out."""
    from convlens.compiler.program import given_config
    from convlens.compiler.trace import trace_key

    inverse = program.inverse()
    live = {u.index for u in units if u.reason is None}
    for u, key in _live_examples(units):
        want, tf_fired = _oracle_rename(oracle, u, key)
        if tf_fired - live:
            continue  # an untranslated transform renames it in transformers
        config = given_config(u.given)
        fwd = trace_key(program, key, config)
        fired = _fired_units(fwd, owner)
        if fwd.note or not fwd.reaches(want):
            got = ", ".join(fwd.results) + (f" ({fwd.note})" if fwd.note else "")
            diff = [i for i in sorted(set(fired) ^ (tf_fired & live)) if i in live]
            culprit = by_index[diff[0]] if diff else u
            via = "" if culprit is u else f" (an example of {u.item})"
            culprit.reason = (f"on {key!r}{via} transformers gives {want!r}, the "
                              f"translation {got or 'nothing'}")
            return True
        back = trace_key(inverse, want, config)
        if back.note or not back.reaches(key):
            got = ", ".join(back.results) + (f" ({back.note})" if back.note else "")
            theirs = oracle.revert(want)
            if not back.note and back.reaches(theirs):
                # transformers' save side does the same: faithful, but no round trip
                note = (f"not invertible on {key!r}: it becomes {want!r}, which goes "
                        f"back to {theirs!r} (in transformers' save too); convlens "
                        "refuses such a checkpoint at run time")
                owner_unit = u
                extra = [i for i in _fired_units(back, owner) if i not in fired]
                if extra:
                    owner_unit = by_index[extra[0]]
                if note not in owner_unit.notes:
                    owner_unit.notes.append(note)
                u.no_expect.add(key)
                continue
            extra = [i for i in _fired_units(back, owner) if i not in fired]
            culprit = by_index[extra[0]] if extra else u
            culprit.reason = (
                f"not invertible on the keys transformers makes: {key!r} -> {want!r}, "
                f"whose inverse gives {got or 'nothing'}"
                + ("" if culprit is u else " (this rule's inverse renames it too)"))
            return True
    return False


def _expects(units: list[_Unit], oracle: _Transformers) -> list[_Expect]:
    out: list[_Expect] = []
    live = {u.index for u in units if u.reason is None}
    for u, key in _live_examples(units):
        want, fired = _oracle_rename(oracle, u, key)
        item = (key, want, u.given)
        if fired <= live and item not in out and key not in u.no_expect:
            out.append(item)
    return out


def _oracle_rename(oracle: _Transformers, u: _Unit, key: str) -> tuple[str, frozenset[int]]:
    """transformers' renaming of an example key, with the target its converter's op picks
    where the renaming alone names the first target (the Ernie op)."""
    want, fired = oracle.rename(key)
    if key in u.retarget:
        first, mine = u.retarget[key]
        want = want.replace(first, mine, 1)
    return want, fired


def _live_examples(units: list[_Unit]) -> Iterator[tuple[_Unit, str]]:
    """Every example key of the units still translated (no reason to leave them out)."""
    for u in units:
        if u.reason is None:
            for keys in u.examples:
                for key in keys:
                    yield u, key


_CHECK_CACHE: dict[tuple[str, bool], Any] = {}


def _check(program: Any, schemes: bool) -> Any:
    """``check_program`` as ``convlens check`` runs it (three seeds; every quantized scheme when
    ``schemes``), memoized on the rules' text: registry aliases share their programs."""
    from convlens.checking import check_program
    from convlens.compiler.schemes import all_schemes

    body = "\n".join(f"{r.span.line}:{r.text}" for r in program.rules) + "\n" + "\n".join(
        f"{e.src}->{e.dst} {e.config}" for e in program.expects)
    cache_key = (body, schemes)
    if cache_key not in _CHECK_CACHE:
        chosen = [sc for sc in all_schemes() if sc.quantized] if schemes else []
        _CHECK_CACHE[cache_key] = check_program(program, range(3), chosen)
    return _CHECK_CACHE[cache_key]


# --- public entry points ------------------------------------------------------------------------


def import_transformers(name: str, *, validate: bool = True, schemes: bool = False
                        ) -> ImportResult:
    """The ``.conv`` text for one key of transformers' conversion registry (a model type such as
    ``"mixtral"`` or a class name such as ``"Qwen2VLForConditionalGeneration"``).

    A class name that is not a registry key but a transformers model class is built on the meta
    device from its default config, and the mapping ``get_model_conversion_mapping`` assembles for
    it (root and scoped sub-model transforms) is imported."""
    reg = registry()
    if name in reg:
        import importlib

        cm: Any = importlib.import_module("transformers.conversion_mapping")
        transforms = cm.get_checkpoint_conversion_mapping(name)
        aliases = _aliases(name, reg)
        return translate_transforms(name, transforms, keys=aliases,
                                    source=f"conversion mapping {name!r}", validate=validate,
                                    schemes=schemes)
    model = _meta_model(name)
    if model is None:
        from convlens.errors import did_you_mean

        hint = did_you_mean(name, sorted(reg))
        raise ValueError(f"{name!r} is neither a key of transformers' conversion mapping nor a "
                         "transformers model class" + (f"; {hint}" if hint else ""))
    return import_model(model, name=name, validate=validate, schemes=schemes)


def _aliases(name: str, reg: dict[str, list[Any]]) -> list[str]:
    """The keys whose entry is the same list (transformers copies a base entry per alias)."""
    try:
        from transformers.conversion_mapping import _MODEL_TO_CONVERSION_PATTERN as aliases
    except ImportError:  # pragma: no cover
        return [name]
    mine = [_describe(t) for t in reg[name]]
    same = [a for a, base in aliases.items()
            if base == name and a in reg and [_describe(t) for t in reg[a]] == mine]
    return [name, *same]


def _meta_model(name: str) -> Any:
    tf = _transformers()
    cls = getattr(tf, name, None)
    if cls is None or not isinstance(cls, type) or not hasattr(cls, "config_class"):
        return None
    import torch

    config_class = getattr(cls, "config_class", None)
    if config_class is None:
        return None
    with torch.device("meta"):
        return cls(config_class())


def import_model(model: Any, *, name: str | None = None, validate: bool = True,
                 schemes: bool = False) -> ImportResult:
    """The ``.conv`` text for the mapping transformers assembles for ``model``
    (``get_model_conversion_mapping(model, add_legacy=False)``): root transforms, then each
    sub-model's transforms scoped to its module path."""
    from transformers.conversion_mapping import get_model_conversion_mapping

    transforms = get_model_conversion_mapping(model, add_legacy=False)
    cls = type(model).__name__
    keys = [cls]
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type:
        keys.append(model_type)
    state_keys = [k for k, _ in model.named_parameters()] + [k for k, _ in model.named_buffers()]
    return translate_transforms(name or cls, transforms, keys=keys,
                                source=f"get_model_conversion_mapping({cls})", validate=validate,
                                schemes=schemes, model_keys=state_keys)


def import_all(*, validate: bool = True, schemes: bool = False) -> dict[str, ImportResult]:
    """Every key of transformers' conversion registry, imported."""
    return {name: import_transformers(name, validate=validate, schemes=schemes)
            for name in registry()}


def summary(results: dict[str, ImportResult]) -> str:
    """Counts over imported keys, and the reasons for what was left out, grouped."""
    complete = sum(r.complete for r in results.values())
    partial = sum(bool(r.rules) and not r.complete for r in results.values())
    none = sum(not r.rules and bool(r.untranslatable) for r in results.values())
    empty = sum(not r.rules and not r.untranslatable for r in results.values())
    items = [u for r in results.values() for u in r.untranslatable]
    lines = [f"{len(results)} keys: {complete} translated completely, {partial} partly, "
             f"{none} not at all, {empty} empty; {len(items)} untranslated transform(s)"]
    groups: dict[str, list[str]] = {}
    for u in items:
        groups.setdefault(_reason_group(u.reason), []).append(u.key)
    for reason, names in sorted(groups.items(), key=lambda kv: -len(kv[1])):
        shown = ", ".join(sorted(set(names))[:6]) + (" ..." if len(set(names)) > 6 else "")
        lines.append(f"  {len(names):4}  {reason}  [{shown}]")
    return "\n".join(lines)


def _reason_group(reason: str) -> str:
    r = re.sub(r"'[^']*'|\"[^\"]*\"", "'...'", reason)
    r = re.sub(r"\{[^}]*\}", "{...}", r)
    r = re.sub(r"\d+", "N", r)
    return r[:140]
