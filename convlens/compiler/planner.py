"""Rules + tensor headers -> a plan. Names, shapes and dtypes only; no tensor data is read.

Rules run in order, each over the whole key set produced by the previous one (a pass). The values
flowing between passes are plan nodes, so the final plan composes every rule into one expression
per output key. Accounting is structural: every current key is either renamed, consumed by
exactly one group, or passed through; a second writer of a key is a collision error naming both.
"""

from __future__ import annotations

import gc
import operator
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Protocol

from convlens.compiler import ops as O
from convlens.compiler import plan as P
from convlens.compiler.layout import (
    RoleMeta,
    canonical_from_view,
    default_axes,
    detect,
    fit_role,
    is_stack_axis,
    view_shape,
)
from convlens.compiler.naming import key_for, owns, role_of
from convlens.compiler.patterns import KeyMatcher
from convlens.compiler.program import Program, Rule
from convlens.compiler.schemes import all_schemes, companion_roles, config_hints
from convlens.errors import ConversionError


@dataclass(frozen=True)
class TensorMeta:
    shape: tuple[int, ...]
    dtype: str


class HasMeta(Protocol):
    """What ``plan`` reads of a tensor: a TensorMeta, or a plan node (the name check plans the
    inverse on a plan's outputs directly)."""

    @property
    def shape(self) -> tuple[int, ...]: ...

    @property
    def dtype(self) -> str: ...


@dataclass
class _Member:
    roles: dict[str, tuple[str, P.Node]] = field(default_factory=dict)  # role -> (key, node)


@dataclass
class _Group:
    captures: dict[str, str]
    first: str  # first key, for messages
    parts: list[dict[tuple[int, ...], _Member]]  # per source pattern: stack index -> member


@contextmanager
def _gc_paused() -> Iterator[None]:
    """Planning allocates a few objects per key (300k keys: millions) and frees almost none, so
    the cyclic collector, run every 700 allocations, keeps walking a heap that only grows: a
    third of the planning time. Plan nodes and the values between them form no cycles, so
    nothing is left for it to find; it is paused while planning and resumed (if it was on)
    afterwards, collecting as usual from then on."""
    if not gc.isenabled():
        yield
        return
    gc.disable()
    try:
        yield
    finally:
        gc.enable()


def plan(program: Program, metas: Mapping[str, HasMeta], config: Mapping[str, Any] | None = None,
         *, strict: bool = False, policies: frozenset[str] = frozenset()) -> P.Plan:
    """Plan ``program`` over tensors described by ``metas`` (key -> shape and dtype).

    ``policies``: lossy steps the user allows (``max``, ``rescale``, ``requantize``); without
    them, per-part scalars a fused tensor holds once must be bit-identical."""
    with _gc_paused():
        return _plan(program, metas, config, strict, policies)


def _plan(program: Program, metas: Mapping[str, HasMeta], config: Mapping[str, Any] | None,
          strict: bool, policies: frozenset[str]) -> P.Plan:
    unknown = set(policies) - set(O.POLICIES)
    if unknown:
        raise ConversionError(f"unknown lossy policy {sorted(unknown)[0]!r}; policies: "
                              + ", ".join(O.POLICIES))
    program = program.resolve(config)  # config values in patterns ({e+config.n})
    rules = list(program.rules)
    refs = [r.ref for r in rules]
    new_load = P.new_load  # Load(k, shape, dtype), without the frozen __init__ (300k keys)
    state: dict[str, P.Node] = {k: new_load(k, tuple(m.shape), m.dtype, -1)
                                for k, m in metas.items()}
    initial = dict(state)
    touched: set[str] = set()
    counts: dict[int, int] = {}
    cfg = config or {}
    index = 0
    while index < len(rules):
        rule = rules[index]
        if rule.kind == "rename":  # a run of consecutive renames is one pass over the keys
            end = index + 1
            while end < len(rules) and rules[end].kind == "rename":
                end += 1
            state = _rename_run(rules, index, end, state, touched, counts)
            index = end
            continue
        if rule.kind in ("drop", "restore"):
            state = _copy_pass(rule, index, state, touched, counts)
        else:
            state = _tensor_pass(rule, index, state, touched, counts, cfg, policies)
        index += 1
    # a key passed through if it comes out under its own name as the very Load it went in as
    passthrough = [k for k, load in initial.items() if state.get(k) is load and k not in touched]
    if strict and passthrough:
        shown = ", ".join(passthrough[:10]) + (" ..." if len(passthrough) > 10 else "")
        raise ConversionError(
            f"strict: {len(passthrough)} key(s) match no rule of {program.name}: {shown}")
    return P.Plan(conversion=program.name, direction=program.direction, outputs=state, rules=refs,
                  rule_counts=counts, passthrough=passthrough)


def _origins(node: P.Node) -> str:
    keys = sorted({leaf.key for leaf in P.leaves(node)})
    return keys[0] if len(keys) == 1 else f"{keys[0]} (+{len(keys) - 1} more)"


def _put(out: dict[str, P.Node], key: str, node: P.Node, rule: Rule) -> None:
    if key in out:
        raise ConversionError(
            f"two tensors would be written to {key!r}: one from {_origins(out[key])}, one from "
            f"{_origins(node)}", span=rule.span, rule=rule.ref.label, key=key)
    out[key] = node


def _mark(touched: set[str], node: P.Node) -> None:
    """Record that a rule matched a Load directly (renames keep the node object)."""
    if isinstance(node, P.Load):
        touched.add(node.key)


def _rekey(rule: Rule, stem: str, tail: str, key: str) -> str:
    if rule.src.naming == rule.dst.naming:
        return stem + tail
    role = role_of(tail, rule.src.naming)
    if role is None or "." in role:
        raise ConversionError(
            f"key {key!r} does not fit {rule.src.naming} naming ({rule.src.patterns[0].text}), so "
            f"it cannot be renamed into {rule.dst.naming} naming", span=rule.span,
            rule=rule.ref.label, key=key)
    return key_for(stem, role, rule.dst.naming)


class _Renamer:
    """One rename rule applied to single keys. The new stem is worked out once per (pattern,
    stem): a match's captures, and so the guards' verdict and the formatted stem, are the same
    for every key with that stem (the leftmost, shortest match that ends where the stem ends is
    found on the stem's text alone), so a key costs one regex match and a dict lookup."""

    def __init__(self, rule: Rule) -> None:
        self.rule = rule
        self.matcher = KeyMatcher(rule.src.patterns)
        self.dst = rule.dst.patterns[0]
        self.same_naming = rule.src.naming == rule.dst.naming
        self.memo: dict[tuple[int, str], str | None] = {}
        # one plain pattern (the usual rename): its regex straight, without the matcher
        pats = rule.src.patterns
        self.regex = pats[0].regex if len(pats) == 1 and pats[0].regex_only else None

    def __call__(self, key: str) -> str | None:
        j, end = 0, -1
        if self.regex is not None:
            found = self.regex.match(key)
            if found is None:
                return None
            end = found.end()
        else:
            hit = self.matcher.stem_end(key)
            if hit is None:
                return None
            j, end = hit
        stem = key[:end]
        new = self.memo.get((j, stem), _UNSEEN)
        if new is _UNSEEN:
            full = self.matcher.match(key)
            assert full is not None and full[0] == j and full[1].stem == stem
            caps = full[1].captures
            new = self.memo[j, stem] = (self.dst.format(caps) if all(
                g.allows(caps) for g in self.rule.guards) else None)
        if new is None:
            return None
        tail = key[end:]
        return new + tail if self.same_naming else _rekey(self.rule, new, tail, key)


_UNSEEN: Any = object()


def _rename_run(rules: list[Rule], start: int, end: int, state: dict[str, P.Node],
                touched: set[str], counts: dict[int, int]) -> dict[str, P.Node]:
    """Rules ``start..end-1`` (all renames) over ``state`` in one pass: each rule renames the
    names the previous ones left, and the dict is built once at the end, in order with
    renamed keys in place. Renames map a name to one name, so two keys that meet under one
    name at some rule still share it at the end: a collision is found there, and the rules
    are then run one by one to name the one that made it."""
    names = list(state)
    nodes = list(state.values())
    hits: dict[int, list[int]] = {}
    for index in range(start, end):
        renamer = _Renamer(rules[index])
        done = []
        for i in renamer.matcher.candidate_positions(names):
            new = renamer(names[i])
            if new is not None:
                names[i] = new
                done.append(i)
        if done:
            hits[index] = done
    if not hits:
        return state
    out = dict(zip(names, nodes, strict=True))
    if len(out) != len(nodes):
        for index in range(start, end):
            state = _rename_pass(rules[index], index, state, touched, counts)
        raise AssertionError("a collision of a rename run was not found rule by rule")
    for index, done in hits.items():
        counts[index] = counts.get(index, 0) + len(done)
        for i in done:
            _mark(touched, nodes[i])
    return out


def _rename_pass(rule: Rule, index: int, state: dict[str, P.Node], touched: set[str],
                 counts: dict[int, int]) -> dict[str, P.Node]:
    """One rename rule over ``state`` (the one-by-one path that names a collision's rule)."""
    renamer = _Renamer(rule)
    renamed: dict[str, str] = {}
    for key in renamer.matcher.candidates(state):
        new = renamer(key)
        if new is not None:
            renamed[key] = new
    if not renamed:
        return dict(state)
    get = renamed.get
    out = {get(k, k): node for k, node in state.items()}  # in order, renamed keys in place
    if len(out) != len(state):  # two keys onto one: found again one by one for the message
        out = {}
        for key, node in state.items():
            _put(out, get(key, key), node, rule)
    for key in renamed:
        _mark(touched, state[key])
    counts[index] = counts.get(index, 0) + len(renamed)
    return out


def _copy_pass(rule: Rule, index: int, state: dict[str, P.Node], touched: set[str],
               counts: dict[int, int]) -> dict[str, P.Node]:
    """drop: remove the src stem's tensors, checked equal to the dst stem's (kept) ones.
    restore: write the dst stem's tensors again as copies of the src stem's."""
    src, dst = rule.src.patterns[0], rule.dst.patterns[0]
    out: dict[str, P.Node] = {}
    pending: list[tuple[str, str]] = []  # (copy key, original key)
    for key in state:
        m = src.match(key)
        if m is not None and all(g.allows(m.captures) for g in rule.guards):
            pending.append((key, _rekey(rule, dst.format(m.captures), m.tail, key)))
    if rule.kind == "drop":
        dropped = {k: other for k, other in pending}
        for key, node in state.items():
            if key in dropped:
                continue
            out[key] = node
        for key, other in dropped.items():
            if other not in out:
                raise ConversionError(
                    f"drop: {key!r} can only be dropped next to {other!r}, which is missing",
                    span=rule.span, rule=rule.ref.label, key=key)
            kept, gone = out[other], state[key]
            if kept.shape != gone.shape or kept.dtype != gone.dtype:
                raise ConversionError(
                    f"drop: {key!r} ({gone.dtype}{list(gone.shape)}) is not a copy of {other!r} "
                    f"({kept.dtype}{list(kept.shape)})", span=rule.span, rule=rule.ref.label,
                    key=key)
            out[other] = O.n_same([kept, gone], index)
            _mark(touched, gone)
    else:
        out = dict(state)
        for key, copy in pending:
            _put(out, copy, state[key], rule)
            _mark(touched, state[key])
    if pending:
        counts[index] = counts.get(index, 0) + len(pending)
    return out


def _tensor_pass(rule: Rule, index: int, state: dict[str, P.Node], touched: set[str],
                 counts: dict[int, int], config: Mapping[str, Any],
                 policies: frozenset[str]) -> dict[str, P.Node]:
    patterns = rule.src.patterns
    naming = rule.src.naming
    guards = rule.guards
    stacked = rule.stacked
    group_names = sorted(c for c in patterns[0].captures if c not in stacked)
    groups: dict[tuple[str, ...], _Group] = {}
    order: list[tuple[str, Any]] = []  # ("key", key) | ("group", gid), in input order
    match = KeyMatcher(patterns).match
    # tuple(caps[c] for c in names), as one C call (itemgetter of one name gives no tuple)
    gid_of = _getter(group_names)
    idx_of = _getter(stacked)
    # owns() and role_of() are pure functions of (tail, naming): computed once per tail
    tails: dict[str, tuple[bool, str | None]] = {}
    for key, node in state.items():
        hit = match(key)
        if hit is None:
            order.append(("key", key))
            continue
        j, m = hit
        info = tails.get(m.tail)
        if info is None:
            info = tails[m.tail] = (owns(m.tail, naming), role_of(m.tail, naming))
        owned, role = info
        if not (owned and (not guards or all(g.allows(m.captures) for g in guards))):
            hit = _later_pattern(patterns, j, key, naming, guards)
            if hit is None:
                order.append(("key", key))
                continue
            j, m = hit
            role = role_of(m.tail, naming)
        if role is None:
            raise ConversionError(
                f"{key!r} matches {patterns[j].text!r} but is not a tensor of that stem under "
                f"{rule.src.naming} naming", span=rule.span, rule=rule.ref.label, key=key,
                hint="a leaf the rule cannot place; rename it away first or narrow the pattern")
        caps = m.captures
        gid = gid_of(caps)
        group = groups.get(gid)
        if group is None:
            group = groups[gid] = _Group(dict(zip(group_names, gid, strict=True)), key,
                                         [{} for _ in patterns])
            order.append(("group", gid))
        idx = tuple(map(int, idx_of(caps)))
        part = group.parts[j]
        member = part.get(idx)
        if member is None:
            member = part[idx] = _Member({})
        if role in member.roles:  # pragma: no cover - keys are unique and naming is injective
            raise ConversionError(f"{key!r}: role {role} seen twice", key=key, rule=rule.ref.label)
        member.roles[role] = (key, node)
    out: dict[str, P.Node] = {}
    made = 0
    for kind, item in order:
        if kind == "key":
            if item in out:
                _put(out, item, state[item], rule)  # raises: a second writer
            out[item] = state[item]
            continue
        results = _build_group(rule, index, groups[item], config, policies)
        # one C-level update per group (an unstack makes hundreds of keys): a collision, inside
        # the group or with a key already out, is found again one by one for its message
        new = dict(results)
        if len(new) != len(results) or not out.keys().isdisjoint(new):
            for key, node in results:
                _put(out, key, node, rule)  # raises: a second writer
        out.update(new)
        touched.update([n.key for n in new.values() if n.__class__ is P.Load])  # _mark
        made += len(new)
    if made:
        counts[index] = counts.get(index, 0) + made
    return out


def _getter(names: Any) -> Any:
    """``lambda caps: tuple(caps[n] for n in names)``, fast."""
    if not names:
        return lambda caps: ()
    if len(names) == 1:
        name = names[0]
        return lambda caps: (caps[name],)
    return operator.itemgetter(*names)


def _later_pattern(patterns: tuple[Any, ...], first: int, key: str, naming: Any,
                   guards: tuple[Any, ...]) -> tuple[int, Any] | None:
    """The first pattern after ``first`` that owns ``key`` (the matcher stops at the first
    regex match, which a guard or the naming may still turn down)."""
    for j in range(first + 1, len(patterns)):
        m = patterns[j].match(key)
        if m is not None and owns(m.tail, naming) and all(g.allows(m.captures) for g in guards):
            return j, m
    return None


def _describe(captures: dict[str, str]) -> str:
    return ", ".join(f"{k}={v}" for k, v in sorted(captures.items())) or "-"


def _build_group(rule: Rule, index: int, group: _Group, config: Mapping[str, Any],
                 policies: frozenset[str] = frozenset()) -> list[tuple[str, P.Node]]:
    ctx = O.OpContext(index, rule.ref.label, rule.span, config, _describe(group.captures),
                      policies)
    hints = config_hints(config)
    streams: list[O.Stream] = []
    role_sets: set[frozenset[str]] = set()
    checks: list[P.Node] = []
    meta_roles: set[str] = set()
    carried: list[dict[str, tuple[str, P.Node]]] = []  # per part: its companion roles
    known = companion_roles()
    seen_roles: set[tuple[str, ...]] = set()  # role tuples already in role_sets
    for j, part in enumerate(group.parts):
        pattern = rule.src.patterns[j]
        if not part:
            raise ctx.fail(f"no tensors match {pattern.text!r} next to {group.first!r}; every "
                           "pattern of the rule needs its part")
        members: dict[tuple[int, ...], O.StemValue] = {}
        carried.append({})
        for idx, member in sorted(part.items()):
            member, extra = _companions(ctx, member, known)
            if extra and (idx or rule.stacked):
                raise ctx.fail(f"{', '.join(extra)} belong(s) to one stem and cannot be stacked "
                               "with the experts", key=next(iter(extra.values()))[0])
            if extra:
                carried[j].update(extra)
            members[idx], more, names = _stem_value(rule, ctx, member, hints)
            if more:
                checks += more
                meta_roles |= names
            names_seen = tuple(member.roles)
            if names_seen not in seen_roles:
                seen_roles.add(names_seen)
                role_sets.add(frozenset(names_seen))
        streams.append(O.Stream(pattern.text, rule.stacked, members))
    if len(role_sets) > 1:
        sets = sorted(sorted(s) for s in role_sets)
        raise ctx.fail(f"the parts have different tensors: {sets}")
    for op in rule.ops:
        streams = op.apply(streams, ctx)
    placed = _place_companions(rule, ctx, group, carried, streams) if any(carried) else None
    results: list[tuple[str, P.Node]] = []
    axes_ok: set[Any] = set()
    naming = rule.dst.naming
    module = naming == "module"  # key_for(stem, role, "module"), inlined below
    meta_sorted = sorted(meta_roles)
    for i, (stream, pattern) in enumerate(zip(streams, rule.dst.patterns, strict=True)):
        family = stream.captures
        # one dict per stream: every member overwrites the same family captures
        caps = dict(group.captures)
        fmt = pattern.format
        for idx, value in stream.members.items():
            if value.axes not in axes_ok:  # _check_axes returns at once for axes seen ok
                _check_axes(rule, ctx, value, axes_ok)
            for c, n in zip(family, idx, strict=True):
                caps[c] = str(n)
            stem = fmt(caps)
            for role, rv in value.roles.items():
                # _stored gives the node itself when the role has no view
                results.append((f"{stem}.{role}" if module else key_for(stem, role, naming),
                                rv.node if rv.view is None else _stored(value, rv, index)))
            for role in meta_sorted:
                dtype = value.scheme.roles[role].dtype or "I64"
                const = P.Const(value.shape, (len(value.shape),), dtype, index)
                results.append((key_for(stem, role, rule.dst.naming), const))
            if placed is not None:
                for role, (_, node) in placed[i].items():
                    results.append((key_for(stem, role, rule.dst.naming), node))
    if checks and results:
        key, first = results[0]
        results[0] = (key, P.Verify(first, tuple(checks), first.shape, first.dtype, index))
    return results


def _companions(ctx: O.OpContext, member: _Member, known: Mapping[str, Any]
                ) -> tuple[_Member, dict[str, tuple[str, P.Node]]]:
    """Split a stem's companion roles (KV-cache scales: they belong to this stem alone and go
    around the ops) from the roles of its weight's scheme. ``known``: ``companion_roles()``."""
    if known.keys().isdisjoint(member.roles):
        return member, {}
    own = _Member({r: kv for r, kv in member.roles.items() if r not in known})
    extra = {r: kv for r, kv in member.roles.items() if r in known}
    for role, (key, node) in extra.items():
        fit = fit_role(known[role], RoleMeta(node.shape, node.dtype), (), {})
        if isinstance(fit, str):
            raise ctx.fail(f"companion role {fit}", role=role, key=key)
    return own, extra


def _last(stem: str) -> str:
    return stem.rsplit(".", 1)[-1]


def _place_companions(rule: Rule, ctx: O.OpContext, group: _Group,
                      carried: list[dict[str, tuple[str, P.Node]]], streams: list[O.Stream]
                      ) -> list[dict[str, tuple[str, P.Node]]]:
    """Which output stem gets each companion role: the same part through per-tensor ops, the
    fused stem when parts are joined, and the one part named as its home when split."""
    known = companion_roles()
    if any(s.captures or set(s.members) != {()} for s in streams):
        role = next(r for c in carried for r in c)
        raise ctx.fail(f"{role} belongs to one stem and cannot go through a stack or unstack",
                       role=role)
    src = [_last(p.format(group.captures)) for p in rule.src.patterns]
    dst = [_last(p.format(group.captures)) for p in rule.dst.patterns]
    out: list[dict[str, tuple[str, P.Node]]] = [{} for _ in streams]
    if len(carried) == len(streams):
        return carried
    if len(streams) == 1:
        for j, roles in enumerate(carried):
            for role, (key, node) in roles.items():
                if role in out[0]:
                    raise ctx.fail(f"{role} of {key!r} and of {out[0][role][0]!r} would both "
                                   "land on the fused stem", role=role, key=key)
                if src[j] not in known[role].homes:
                    raise ctx.fail(
                        f"{role} sits on {src[j]!r}, which is not one of the stems that may "
                        f"carry it ({', '.join(known[role].homes)}): the split back could not "
                        "tell which part it belongs to", role=role, key=key)
                out[0][role] = (key, node)
        return out
    if len(carried) == 1:
        for role, (key, node) in carried[0].items():
            homes = [i for i, name in enumerate(dst) if name in known[role].homes]
            if len(homes) != 1:
                raise ctx.fail(
                    f"{role} of {key!r} belongs to one part, but "
                    + ("none" if not homes else ", ".join(dst[i] for i in homes))
                    + f" of the parts ({', '.join(dst)}) is named as its stem "
                    f"({', '.join(known[role].homes)})", role=role, key=key)
            out[homes[0]][role] = (key, node)
        return out
    role = next(r for c in carried for r in c)
    raise ctx.fail(f"{role} belongs to one stem; a rule from {len(carried)} parts to "
                   f"{len(streams)} cannot place it", role=role)


# role signature -> (detected scheme or the reason none fits, the recipe of its roles)
_STEMS: dict[tuple[Any, ...], Any] = {}


_Recipe = tuple[tuple[Any, ...], ...]


def _stem_recipe(found: Any, sig: tuple[Any, ...]) -> _Recipe:
    """Per role, in the member's order: what ``_stem_value`` does with it. All of it depends
    on the signature only (roles, shapes, dtypes, axes, hints), so it is worked out once per
    signature, not once per expert: (metadata?, canonical shape or None if the stored shape
    is canonical, layout, spec, view)."""
    recipe = []
    for role, shape, _ in sig[0]:
        fit = found.roles[role]
        spec = found.scheme.roles[role]
        if spec.kind == "shape":
            recipe.append((True, None, None, spec, None))
            continue
        recipe.append((False, None if fit.canonical == shape else fit.canonical, fit.layout,
                       spec, fit.view))
    return tuple(recipe)


def _stem_value(rule: Rule, ctx: O.OpContext, member: _Member, hints: frozenset[str]
                ) -> tuple[O.StemValue, list[P.Node], set[str]]:
    """A stem's value for the ops, the checks of its metadata roles, and their names."""
    items = member.roles.items()
    sig = (tuple([(role, node.shape, node.dtype) for role, (_, node) in items]),
           rule.src.axes, hints)
    cached = _STEMS.get(sig)
    if cached is None:
        metas = {role: RoleMeta(shape, dtype) for role, shape, dtype in sig[0]}
        found = detect(all_schemes(), metas, rule.src.axes, hints)
        cached = (found, None if isinstance(found, str) else _stem_recipe(found, sig))
        if len(_STEMS) > 4096:
            _STEMS.clear()
        _STEMS[sig] = cached
    found, recipe = cached
    keys = tuple([k for k, _ in member.roles.values()])
    if isinstance(found, str):
        raise ctx.fail(found, key=keys[0])
    assert recipe is not None
    roles = {}
    checks: list[P.Node] = []
    meta_roles: set[str] = set()
    origin = ctx.origin
    new_role_value = O.new_role_value
    for (role, (key, node)), (meta, canonical, layout, spec, view) in zip(items, recipe,
                                                                          strict=True):
        if meta:
            # metadata: checked against the logical shape here, written anew for each output
            want = P.Const(found.shape, node.shape, node.dtype, origin)
            checks.append(O.n_same([node, want], origin))
            meta_roles.add(role)
            continue
        if canonical is not None:
            node = O.n_reshape(node, canonical, origin)
        roles[role] = new_role_value(node, layout, spec, view, key)
    return (O.new_stem_value(found.scheme, found.axes, found.shape, roles, keys), checks,
            meta_roles)


def _normal(axes: tuple[str, ...]) -> tuple[str, ...]:
    return tuple("e" if is_stack_axis(a) else a for a in axes)


def _check_axes(rule: Rule, ctx: O.OpContext, value: O.StemValue, seen: set[Any]) -> None:
    """The target must read the result with the axes the ops produced, or the inverse would
    lift its ops to the wrong axes (a transposed bias would be permuted as if it were rows)."""
    if value.axes in seen:
        return
    want = rule.dst.axes if rule.dst.axes is not None else default_axes(len(value.axes))
    if _normal(value.axes) == _normal(want):
        seen.add(value.axes)
    else:
        raise ctx.fail(
            f"the ops leave axes ({', '.join(value.axes)}) but the target reads "
            f"({', '.join(want)}); declare them: {rule.dst.patterns[0].text!r} ... axes "
            f"({', '.join(value.axes)})", key=value.keys[0])


def _stored(value: O.StemValue, rv: O.RoleValue, origin: int) -> P.Node:
    """A role's output node in the form it was stored in (its view). A view that cannot hold
    the result (a 0-d single-block scale after fusing into several blocks) gives way to the
    scheme's first view that can."""
    if rv.view is None:
        return rv.node
    sizes = dict(zip(value.axes, value.shape, strict=True))
    lead = 0
    own = {a.name for a in rv.spec.axes}
    while lead < len(rv.layout) and rv.layout[lead].name not in own:
        lead += 1
    order = [rv.view, *(i for i in range(len(rv.spec.views)) if i != rv.view)]
    for i in order:
        view = rv.spec.views[i]
        shape = rv.node.shape[:lead] + view_shape(view, sizes)
        if canonical_from_view(view, shape, lead, len(rv.layout) - lead) == rv.node.shape:
            return O.n_reshape(rv.node, shape, origin)
    return rv.node
