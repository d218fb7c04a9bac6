"""Quantization configs follow the weights.

A conversion that renames, splits or fuses modules must rewrite the module names that the
quantization configs carry: ``config.json["quantization_config"]`` (``ignore``,
``exclude_modules``, ``modules_to_not_convert``, ``quantized_layers`` and the module-name or
``re:`` entries of ``config_groups.*.targets``) and ``hf_quant_config.json["quantization"]``
(``exclude_modules``, ``quantized_layers``).

Everything is derived from a plan's key map (output key -> the input keys it is built from): a
key's module is the key minus its leaf (``model.layers.0.mlp.gate.weight`` ->
``model.layers.0.mlp.gate``; ``mlp.experts.gate_up_proj_weight_scale`` -> ``mlp.experts``), and an
input module maps to the modules of the output keys its keys feed. Keys of biases
(``bias``, ``*_bias``) are left out: they are never quantized, and a bias moved to another module
(``block_sparse_moe.e_score_correction_bias`` -> ``mlp.gate.e_score_correction_bias``) must not
make that module look fused.

How an entry selects modules depends on the field, as its consumers read it:

- ``re:REGEX`` (compressed-tensors): ``re.match`` on the module name, in every field;
- a glob (an entry with ``*``, ``?`` or ``[``; ModelOpt ``exclude_modules``): ``fnmatch`` on the
  whole module name;
- a plain name: the module of that exact name;
- in ``modules_to_not_convert`` (transformers' ``should_convert_module``) a name or glob also
  selects every module below the one it matches, and a plain name also selects modules whose
  name ends with ``.NAME``.
"""

from __future__ import annotations

import copy
import difflib
import fnmatch
import itertools
import json
import re
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from convlens.errors import ConversionError

__all__ = ["ModuleMap", "map_quantization_configs", "module_of"]

Kind = Literal["name", "glob", "regex"]
Matcher = Callable[[str], bool]
Sub = tuple[str, str]  # literal module-path text -> its replacement

_MAX_SIGNATURES = 32  # distinct (input, output) rename shapes tried per entry
_MAX_CANDIDATES = 512  # candidate patterns tried per entry
_MAX_OPCODES = 4  # diff regions combined freely; beyond that only all-or-one
_MAX_PAIRS = 4096  # (input, output) module pairs looked at per entry


def module_of(key: str) -> str:
    """The module a tensor key belongs to: the key minus its last segment, or, for
    bitsandbytes' dotted leaves (``x.weight.absmax``), the part before ``.weight``."""
    segs = key.split(".")
    if "weight" in segs[:-1]:
        return ".".join(segs[: segs.index("weight")])
    return ".".join(segs[:-1])


def _is_bias(key: str) -> bool:
    leaf = key.rsplit(".", 1)[-1]
    return leaf == "bias" or leaf.endswith("_bias")


@dataclass(frozen=True)
class ModuleMap:
    """Modules of a conversion: ``forward`` maps an input module to the output modules its
    tensors become; ``fused`` maps an output module built from several input modules to them;
    ``inputs``/``outputs`` are all modules on each side (sorted)."""

    forward: dict[str, frozenset[str]]
    fused: dict[str, frozenset[str]]
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]

    @classmethod
    def of(cls, key_map: Mapping[str, Sequence[str]]) -> ModuleMap:
        forward: dict[str, set[str]] = {}
        backward: dict[str, set[str]] = {}
        outputs: set[str] = set()
        for out_key, in_keys in key_map.items():
            if _is_bias(out_key):
                continue
            out_mod = module_of(out_key)
            if not out_mod:
                continue
            outputs.add(out_mod)
            for in_key in in_keys:
                in_mod = module_of(in_key)
                if _is_bias(in_key) or not in_mod:
                    continue
                forward.setdefault(in_mod, set()).add(out_mod)
                backward.setdefault(out_mod, set()).add(in_mod)
        return cls(
            forward={m: frozenset(v) for m, v in forward.items()},
            fused={m: frozenset(v) for m, v in backward.items() if len(v) > 1},
            inputs=tuple(sorted(forward)),
            outputs=tuple(sorted(outputs)),
        )


# --- how entries select modules --------------------------------------------------------------


@dataclass(frozen=True)
class _Semantics:
    below: bool = False  # a match also selects the modules below it
    suffix: bool = False  # a plain name also selects modules ending with ".NAME"


_EXACT = _Semantics()
_NOT_CONVERT = _Semantics(below=True, suffix=True)


def _kind(entry: str) -> Kind:
    if entry.startswith("re:"):
        return "regex"
    if any(c in entry for c in "*?["):
        return "glob"
    return "name"


def _self_and_parents(module: str) -> Iterator[str]:
    yield module
    i = module.rfind(".")
    while i > 0:
        yield module[:i]
        i = module.rfind(".", 0, i)


def _matcher(entry: str, sem: _Semantics) -> Matcher:
    """What ``entry`` selects, as a predicate on module names (raises re.error)."""
    kind = _kind(entry)
    if kind == "regex":
        rx = re.compile(entry[3:])
        return lambda m: rx.match(m) is not None
    if kind == "glob":
        full = re.compile(fnmatch.translate(entry))
        if sem.below:
            return lambda m: any(full.match(a) for a in _self_and_parents(m))
        return lambda m: full.match(m) is not None
    below, suffix = entry + ".", "." + entry

    def by_name(m: str) -> bool:
        return (m == entry or (sem.below and m.startswith(below))
                or (sem.suffix and m.endswith(suffix)))
    return by_name


# --- candidate patterns -------------------------------------------------------------------------


def _join(segs: Sequence[str]) -> str:
    return ".".join(segs)


_ANY = "\x00"  # a replacement segment standing for "anything below": `*` in a glob, `.*` in a regex


def _region(a: list[str], b: list[str], i1: int, i2: int, j1: int, j2: int) -> list[Sub]:
    """``a[i1:i2] -> b[j1:j2]`` as text substitutions; an empty side takes one segment of
    context (left or right) so that no stray dot is left behind. Segments added at the end
    (a module split into ``experts.{e}.w1``...) also give the variant ``experts.<anything>``."""
    if i1 < i2 and j1 < j2:
        alts = [(_join(a[i1:i2]), _join(b[j1:j2]))]
    else:
        alts = []
        if i1 > 0 and j1 > 0 and a[i1 - 1] == b[j1 - 1]:
            alts.append((_join(a[i1 - 1:i2]), _join(b[j1 - 1:j2])))
        if i2 < len(a) and j2 < len(b) and a[i2] == b[j2]:
            alts.append((_join(a[i1:i2 + 1]), _join(b[j1:j2 + 1])))
    if i2 == len(a) and j2 == len(b) and j2 - j1 != i2 - i1 and alts:
        src, dst = alts[0]
        if j2 - j1 > i2 - i1:  # experts -> experts.<anything>
            alts.append((src, _join([*dst.split(".")[:len(src.split("."))], _ANY])))
        else:  # experts.<anything> -> experts
            alts.append((_join([*src.split(".")[:len(dst.split("."))], _ANY]), dst))
    return alts


def _pair_substitutions(m: str, o: str) -> list[tuple[Sub, ...]]:
    """Ways to rewrite the literal parts of a pattern that selected ``m`` so that it selects
    ``o``: every combination of the diff regions of their segments, then the differing head,
    tail and middle as one piece each."""
    a, b = m.split("."), o.split(".")
    regions: list[list[tuple[Sub, ...]]] = []
    for tag, i1, i2, j1, j2 in difflib.SequenceMatcher(None, a, b, autojunk=False).get_opcodes():
        if tag == "equal":
            continue
        alts: list[tuple[Sub, ...]] = [(s,) for s in _region(a, b, i1, i2, j1, j2)]
        if tag == "replace" and i2 - i1 == j2 - j1 > 1:
            alts.append(tuple((a[i], b[j1 + i - i1]) for i in range(i1, i2)))
        if alts:
            regions.append(alts)
    out: list[tuple[Sub, ...]] = []
    if len(regions) <= _MAX_OPCODES:
        choices = [[(), *alts] for alts in regions]
        combos = sorted(itertools.product(*choices), key=lambda c: -sum(1 for x in c if x))
        out.extend(tuple(s for part in combo for s in part) for combo in combos if any(combo))
    else:
        out.append(tuple(s for alts in regions for s in alts[0]))
        out.extend(alts[0] for alts in regions)
    prefix = 0
    while prefix < min(len(a), len(b)) and a[prefix] == b[prefix]:
        prefix += 1
    suffix = 0
    while (suffix < min(len(a), len(b)) - prefix and a[-1 - suffix] == b[-1 - suffix]):
        suffix += 1
    ea, eb = len(a) - suffix, len(b) - suffix
    for i1, i2, j1, j2 in ((0, ea, 0, eb), (prefix, len(a), prefix, len(b)),
                           (prefix, ea, prefix, eb)):
        out.extend((s,) for s in _region(a, b, i1, i2, j1, j2))
    return out


_WORD = "A-Za-z0-9_"


def _render(dst: str, kind: Kind, dot: str) -> str:
    segs = dst.split(".")
    if kind == "regex":
        return dot.join(".*" if seg == _ANY else re.escape(seg) for seg in segs)
    return ".".join("*" if seg == _ANY else seg for seg in segs)


def _substitute(text: str, subs: tuple[Sub, ...], kind: Kind) -> str | None:
    """``text`` with every whole-name occurrence of each source replaced at once (longest
    sources first, no overlaps); None when no source occurs, or when a plain name would get a
    wildcard. In a regex a dot of the source matches ``.`` or ``\\.``, and the replacement's
    dots are written the same way."""
    regex = kind == "regex"
    if kind == "name" and any(_ANY in dst for _, dst in subs):
        return None
    hits: list[tuple[int, int, str]] = []
    for src, dst in sorted(subs, key=lambda s: -len(s[0])):
        if not src:
            continue
        if regex:
            body = r"(?:\\\.|\.)".join(r"(?:\.\*|\.\+)" if seg == _ANY else re.escape(seg)
                                        for seg in src.split("."))
        else:
            body = r"\.".join(r"\*" if seg == _ANY else re.escape(seg) for seg in src.split("."))
        for m in re.finditer(rf"(?<![{_WORD}]){body}(?![{_WORD}])", text):
            if any(m.start() < end and start < m.end() for start, end, _ in hits):
                continue
            dot = "\\." if "\\." in (m.group(0) if "." in src else text) else "."
            rendered = _render(dst, kind, dot)
            hits.append((m.start(), m.end(), rendered))
    if not hits:
        return None
    parts, pos = [], 0
    for start, end, rendered in sorted(hits):
        parts += [text[pos:start], rendered]
        pos = end
    return "".join(parts) + text[pos:]


def _candidates(entry: str, covered: Sequence[str], mm: ModuleMap) -> Iterator[str]:
    """Rewrites of ``entry`` with the renames its selected modules went through, the entry
    itself first."""
    yield entry
    kind = _kind(entry)
    head, text = ("re:", entry[3:]) if kind == "regex" else ("", entry)
    seen_sigs: set[tuple[tuple[Sub, ...], ...]] = set()
    seen: set[str] = {entry}
    pairs = ((m, o) for m in covered for o in sorted(mm.forward[m]))
    for m, o in itertools.islice(pairs, _MAX_PAIRS):
        sig = tuple(_pair_substitutions(m, o))
        if sig in seen_sigs:
            continue
        seen_sigs.add(sig)
        if len(seen_sigs) > _MAX_SIGNATURES:
            return
        for subs in sig:
            new = _substitute(text, subs, kind)
            if new is None or head + new in seen:
                continue
            seen.add(head + new)
            if len(seen) > _MAX_CANDIDATES:
                return
            yield head + new


def _selects_exactly(matcher: Matcher, wanted: set[str], universe: Sequence[str]) -> bool:
    if not all(matcher(o) for o in wanted):
        return False
    return sum(1 for o in universe if matcher(o)) == len(wanted)


# --- one field -------------------------------------------------------------------------------


@dataclass
class _Field:
    label: str
    mm: ModuleMap
    sem: _Semantics
    notes: list[str]

    def note(self, text: str) -> None:
        self.notes.append(f"{self.label}: {text}")

    def select(self, entry: str) -> list[str] | None:
        """The input modules ``entry`` selects (None: not a valid pattern)."""
        try:
            matcher = _matcher(entry, self.sem)
        except re.error as e:
            self.note(f"{entry!r} is not a valid regular expression ({e}); kept unchanged")
            return None
        return [m for m in self.mm.inputs if matcher(m)]

    def map_entry(self, entry: str, covered: Sequence[str] | None) -> list[str]:
        """The entries that select, among the output modules, the modules ``entry``'s become."""
        kind = _kind(entry)
        if not covered:
            if kind != "name" and covered is not None:
                self.note(f"{entry!r} matches no module of the checkpoint; kept unchanged")
            return [entry]
        mapped: set[str] = set().union(*(self.mm.forward[m] for m in covered))
        for cand in _candidates(entry, covered, self.mm):
            try:
                matcher = _matcher(cand, self.sem)
            except re.error:
                continue
            if _selects_exactly(matcher, mapped, self.mm.outputs):
                return [cand]
        listed = sorted(mapped)
        if kind == "name" and len(listed) == 1:
            return listed
        if kind == "name":
            self.note(f"{entry!r} expanded into its {len(listed)} parts: {_some(listed)}")
        else:
            self.note(f"no pattern like {entry!r} selects exactly the {len(listed)} module(s) "
                      f"it maps to; listed them explicitly")
        return listed

    def merged(self, sources: dict[str, list[str]]) -> None:
        """One note per set of entries that became the same entries."""
        groups: dict[tuple[str, ...], list[str]] = {}
        for out, srcs in sources.items():
            distinct = tuple(dict.fromkeys(srcs))
            if len(distinct) > 1:
                groups.setdefault(distinct, []).append(out)
        for distinct, outs in groups.items():
            names = ", ".join(repr(s) for s in distinct)
            if len(outs) == 1:
                self.note(f"{names} merged into {outs[0]!r}")
            else:
                self.note(f"{names} merged into the same {len(outs)} entries: {_some(outs)}")

    def check_closed(self, selected: set[str], what: str) -> None:
        """A fused output module must have all its parts in ``selected`` or none."""
        for out in sorted(self.mm.fused):
            parts = sorted(self.mm.fused[out])
            inside = [p for p in parts if p in selected]
            outside = [p for p in parts if p not in selected]
            if inside and outside:
                raise ConversionError(
                    f"{self.label}: {inside[0]!r} is {what} but {outside[0]!r} is not, and "
                    f"both are fused into {out!r}: the fused tensor would be partially quantized",
                    hint="list every part of a fused module, or none of them")

    def map_list(self, entries: Any, what: str | None) -> Any:
        """A list of entries; ``what``: the closure check's wording (None: no check)."""
        if not isinstance(entries, list):
            return entries
        selections = [self.select(e) if isinstance(e, str) else None for e in entries]
        if what is not None:
            self.check_closed({m for s in selections if s for m in s}, what)
        out: list[Any] = []
        sources: dict[str, list[str]] = {}
        for entry, covered in zip(entries, selections, strict=True):
            if not isinstance(entry, str):
                out.append(entry)
                continue
            for new in self.map_entry(entry, covered):
                if new not in sources:
                    sources[new] = []
                    out.append(new)
                sources[new].append(entry)
        self.merged(sources)
        return out

    def map_layers(self, layers: Any) -> Any:
        """``quantized_layers``: module name -> its quantization settings."""
        if not isinstance(layers, dict):
            return layers
        selections = {k: self.select(k) for k in layers}
        setting_of: dict[str, tuple[str, Any]] = {}
        for key, covered in selections.items():
            for m in covered or ():
                setting_of.setdefault(m, (key, layers[key]))
        for out in sorted(self.mm.fused):
            parts = sorted(self.mm.fused[out], key=lambda p: (p not in setting_of, p))
            first = parts[0]
            for other in parts[1:]:
                a, b = setting_of.get(first), setting_of.get(other)
                if (a is None) != (b is None) or (a is not None and b is not None
                                                  and a[1] != b[1]):
                    raise ConversionError(
                        f"{self.label}: cannot fuse {first!r} ({_describe(a)}) and {other!r} "
                        f"({_describe(b)}) into {out!r}: the parts of a fused module must be "
                        f"quantized alike",
                        hint="quantize every part the same way (or none) before fusing them")
        out_layers: dict[str, Any] = {}
        sources: dict[str, list[str]] = {}
        for key, value in layers.items():
            for new in self.map_entry(key, selections[key]):
                if new in out_layers and out_layers[new] != value:
                    raise ConversionError(
                        f"{self.label}: {sources[new][0]!r} ({_describe((new, out_layers[new]))})"
                        f" and {key!r} ({_describe((key, value))}) both become {new!r}")
                if new not in out_layers:
                    out_layers[new] = copy.deepcopy(value)
                    sources[new] = []
                sources[new].append(key)
        self.merged(sources)
        return out_layers


def _some(names: Sequence[str], limit: int = 8) -> str:
    """``names`` joined, the first ``limit`` of them only."""
    shown = ", ".join(names[:limit])
    return shown if len(names) <= limit else f"{shown}, ... ({len(names) - limit} more)"


def _describe(setting: tuple[str, Any] | None) -> str:
    if setting is None:
        return "not listed: unquantized"
    return json.dumps(setting[1], sort_keys=True)


def _class_like(entry: Any) -> bool:
    """A ``targets`` entry naming a module class (``Linear``), not a module."""
    return isinstance(entry, str) and "." not in entry and entry[:1].isupper()


def _map_section(section: dict[str, Any], where: str, mm: Callable[[], ModuleMap],
                 notes: list[str]) -> None:
    def field(name: str, sem: _Semantics = _EXACT) -> _Field:
        return _Field(f"{where}.{name}", mm(), sem, notes)

    excluded = "excluded from quantization"
    for name in ("ignore", "exclude_modules"):
        if name in section:
            section[name] = field(name).map_list(section[name], excluded)
    if "modules_to_not_convert" in section:
        section["modules_to_not_convert"] = field(
            "modules_to_not_convert", _NOT_CONVERT).map_list(
                section["modules_to_not_convert"], excluded)
    if "quantized_layers" in section:
        section["quantized_layers"] = field("quantized_layers").map_layers(
            section["quantized_layers"])
    groups = section.get("config_groups")
    if isinstance(groups, dict):
        for gname, group in groups.items():
            if isinstance(group, dict) and isinstance(group.get("targets"), list):
                targets = group["targets"]
                what = None if any(_class_like(t) for t in targets) else "targeted by this group"
                group["targets"] = field(f"config_groups.{gname}.targets").map_list(targets, what)


def map_quantization_configs(
    key_map: Mapping[str, Sequence[str]] | Callable[[], Mapping[str, Sequence[str]]],
    config: dict[str, Any] | None,
    hf_quant_config: dict[str, Any] | None,
) -> tuple[dict[str, Any] | None, dict[str, Any] | None, list[str]]:
    """The quantization configs of a converted checkpoint, and notes on what changed.

    ``key_map`` is the plan's :meth:`~convlens.Plan.key_map` (output key -> input keys), or a
    function giving it: it is then only called if a config names modules (a walk over every
    output, ~0.5 s for 200k keys);
    ``config`` the ``config.json`` contents (its ``quantization_config`` is rewritten) and
    ``hf_quant_config`` the ``hf_quant_config.json`` contents (its ``quantization``). Neither
    input is modified. Each entry is mapped to the entries selecting the output modules its
    modules became: a renamed name or pattern is rewritten in place, a split module expands into
    its parts, fused parts merge into one entry; a pattern that cannot be rewritten to select
    exactly the converted modules becomes their sorted list. Entries selecting no module of the
    checkpoint are kept. Notes say every change that is not a 1:1 rename.

    Raises ConversionError when fused parts disagree: some but not all of them excluded (or
    targeted by a config group), or different ``quantized_layers`` settings.
    """
    made: list[ModuleMap] = []

    def mm() -> ModuleMap:
        if not made:
            made.append(ModuleMap.of(key_map() if callable(key_map) else key_map))
        return made[0]

    notes: list[str] = []
    new_config = copy.deepcopy(config)
    new_hf = copy.deepcopy(hf_quant_config)
    if new_config is not None and isinstance(new_config.get("quantization_config"), dict):
        _map_section(new_config["quantization_config"], "config.json quantization_config",
                     mm, notes)
    if new_hf is not None and isinstance(new_hf.get("quantization"), dict):
        _map_section(new_hf["quantization"], "hf_quant_config.json quantization", mm, notes)
    return new_config, new_hf, notes
