"""How an endpoint names the tensors of a stem.

- ``module``: ``{stem}.weight``, ``{stem}.bias``, ``{stem}.weight_scale`` (nn.Module parameters);
- ``param``:  the weight is ``{stem}`` itself, the others ``{stem}_{role}`` (3-D expert parameters
  in transformers and ModelOpt: ``experts.gate_up_proj``, ``experts.gate_up_proj_weight_scale``);
- ``flat``:   ``{stem}_weight``, ``{stem}_weight_scale`` (vLLM's ``w13_weight``).
"""

from __future__ import annotations

from typing import Literal

NamingKind = Literal["module", "param", "flat"]
NAMINGS: tuple[NamingKind, ...] = ("module", "param", "flat")

# Role names that may follow a stem with "_" (suffix siblings). A stem owns "stem_ROLE" only for
# these, so that a stem "gate_up" never swallows "gate_up_proj". Scheme files add their roles.
SUFFIX_ROLES: frozenset[str] = frozenset({
    "weight", "bias",
    "weight_scale", "weight_scale_2", "weight_scale_inv", "scale_inv", "input_scale",
    "weight_packed", "weight_shape", "weight_zero_point", "weight_global_scale",
    "input_global_scale", "weight_g_idx", "pre_quant_scale", "activation_scale",
    "k_scale", "v_scale", "blocks", "scales", "qweight", "qzeros", "g_idx",
})


# Roles a naming spells its own way. transformers keeps the FP8 block scale of a 3-D expert
# parameter as ``experts.gate_up_proj_scale_inv`` (FineGrainedFP8 experts), not
# ``..._weight_scale_inv``; one spelling per naming keeps both directions bit-exact in names.
_SPELLED: dict[tuple[str, str], str] = {("param", "weight_scale_inv"): "scale_inv"}
_READ: dict[tuple[str, str], str] = {(n, spelled): role for (n, role), spelled in _SPELLED.items()}
_UNSPELLED: frozenset[tuple[str, str]] = frozenset(_SPELLED)


def owns(tail: str, naming: NamingKind) -> bool:
    """Whether a tensor rule's stem claims a key with this tail at all.

    A module stem owns ``stem.*`` only: ``mlp.experts.gate_up_proj`` (a param) and
    ``mlp.experts.gate_up_proj_bias`` (its sibling) are not tensors of a module stem
    ``mlp.experts.gate_up_proj``, so a dense-MLP rule leaves the experts alone. Param and flat
    stems own their suffix siblings, and dotted leaves too (which then must have a role)."""
    if naming == "module":
        return tail.startswith(".")
    return tail != "" or naming == "param"


def role_of(tail: str, naming: NamingKind) -> str | None:
    """The role a key plays in its stem, from what follows the stem; None if the naming has no
    place for it."""
    if naming == "module":
        return tail[1:] if tail.startswith(".") and len(tail) > 1 else None
    if naming == "param":
        if tail == "":
            return "weight"
        if not tail.startswith("_"):
            return None
        name = tail[1:]
        if (naming, name) in _UNSPELLED:
            return None  # spelled otherwise in this naming
        return _READ.get((naming, name), name)
    if tail.startswith("_"):
        return tail[1:]
    return None


def key_for(stem: str, role: str, naming: NamingKind) -> str:
    """The key of ``role`` in ``stem`` under ``naming`` (the inverse of :func:`role_of`)."""
    if naming == "module":
        return f"{stem}.{role}"
    if naming == "param" and role == "weight":
        return stem
    return f"{stem}_{_SPELLED.get((naming, role), role)}"
