"""Attach the harness's taps to an existing torch implementation with a mapping, not plumbing.

Three ways to say where a canonical tap lives, combinable in one ``TorchTaps``:

- ``modules``: a submodule's output (or, with ``input:``, its first input) in an ``nn.Module`` tree:
  ``{"layers.{i}.q": "model.layers.{i}.self_attn.q_proj", "layers.{i}.act": "input:model.layers.{i}.mlp.down_proj"}``.
- ``weights``: the output of the op that consumes a weight tensor, found by the tensor's identity
  (its data pointer), whatever function the code calls (``F.linear``, ``x @ w.T``, ``torch.matmul``,
  ``x * w`` for a norm's scale, ``F.embedding`` or ``w[ids]`` for the embedding lookup):
  ``{"layers.{i}.q": wq_of_layer_i, ...}`` or, for weights kept under Hugging Face names,
  ``hf_weight_taps(spec, tensors)``.
- ``functions``: the return value of a plain function looked up by name on a module or object and
  wrapped while attached: ``{(rope_module, "apply_rope"): [("layers.{i}.q_rope", "layers.{i}.k_rope")]}``;
  each call takes the next pattern of the list, ``{i}`` counts complete rounds (the layer), a tuple
  pattern names the elements of a tuple result (``None`` skips one).

Every tapped value goes through ``to_tap_array`` (any float dtype, a batch dimension of 1, per-head
layouts) and what ``tap`` returns comes back in the tensor's own dtype and layout, so in isolated mode
the implementation continues from the golden. Taps named in ``observe`` are handed over for judgement
only: the implementation keeps its own value (the tap's ``observe`` method is used when it has one, so
the verdict can say so).
"""
from __future__ import annotations

import contextlib
import functools
from typing import Any, Callable, Iterable, Iterator, Mapping, Sequence

from harness.deployment.adapters.values import from_tap_array, to_tap_array

Tap = Callable[[str, Any], Any]

# Torch functions that *consume* a weight: their result is the tap. A weight that is only viewed
# (w.T, w.to(...)) is not a tap; register the tensor the code actually multiplies with.
_PRODUCT_NAMES = ("linear", "matmul", "__matmul__", "__rmatmul__", "mm", "addmm", "mul", "__mul__", "__rmul__",
                  "rms_norm", "einsum")
_LOOKUP_NAMES = ("embedding", "__getitem__", "index_select")
# Taps that are the *input* of a weight's op rather than its output (act feeds down_proj, the
# attention context feeds o_proj): handed over, and replaced, before the op runs.
INPUT_KINDS = ("act", "attn")


def expand(template: str, num_layers: int) -> list[tuple[str, int | None]]:
    """``layers.{i}.q`` -> [("layers.0.q", 0), ...]; a name without ``{i}`` -> [(name, None)]."""
    if "{i}" not in template:
        return [(template, None)]
    return [(template.format(i=i), i) for i in range(num_layers)]


def _kind(name: str) -> str:
    return name.rsplit(".", 1)[-1]


class TorchTaps:
    """Where the canonical taps live in one torch implementation; ``attached(tap)`` installs them."""

    def __init__(self, num_layers: int, *, root: Any = None, modules: Mapping[str, str] | None = None,
                 weights: Mapping[str, Any] | None = None, functions: Mapping[tuple[Any, str], Sequence[Any]] | None = None,
                 layouts: Mapping[str, str] | None = None, observe: Iterable[str] = ()):
        self.num_layers = num_layers
        self.root = root
        self.layouts = dict(layouts or {})
        self.observe = set(observe)
        self._modules: list[tuple[str, str, bool]] = []
        for template, target in (modules or {}).items():
            is_input = target.startswith("input:")
            path_t = target.split(":", 1)[1] if is_input else target
            for name, i in expand(template, num_layers):
                self._modules.append((name, path_t.format(i=i) if i is not None else path_t, is_input))
        if self._modules and root is None:
            raise ValueError("TorchTaps: module taps need root= (the nn.Module the paths start from)")
        # weight identity -> {"product": tap, "lookup": tap}
        self._weights: dict[tuple[int, int], dict[str, str]] = {}
        for template, tensors in (weights or {}).items():
            names = expand(template, num_layers)
            if callable(tensors):
                tensors = [tensors(i) for _, i in names]
            elif len(names) > 1 or isinstance(tensors, (list, tuple)):
                tensors = list(tensors)
            else:
                tensors = [tensors]
            if len(tensors) != len(names):
                raise ValueError(f"TorchTaps: {template} names {len(names)} taps but {len(tensors)} tensors")
            for (name, _), t in zip(names, tensors):
                role = "lookup" if _kind(name) == "embed" else "input" if _kind(name) in INPUT_KINDS else "product"
                self._weights.setdefault(self._key(t), {})[role] = name
        self._functions = {k: list(v) for k, v in (functions or {}).items()}

    @staticmethod
    def _key(tensor: Any) -> tuple[int, int]:
        return (tensor.data_ptr(), tensor.numel())

    def tie(self, embedding: Any, logits_name: str = "logits") -> "TorchTaps":
        """A tied LM head: products with the embedding matrix are the ``logits`` tap."""
        self._weights.setdefault(self._key(embedding), {})["product"] = logits_name
        return self

    # -- handing a value over -------------------------------------------------------------------------
    def _hand_over(self, tap: Tap, name: str, value: Any) -> Any:
        layout = self.layouts.get(name) or self.layouts.get(_kind(name))
        arr = to_tap_array(value, layout, name)
        if name in self.observe or _kind(name) in self.observe:
            observe = getattr(tap, "observe", None)
            observe(name, arr) if callable(observe) else tap(name, arr)
            return value
        return from_tap_array(tap(name, arr), value, layout, name)

    # -- installing -----------------------------------------------------------------------------------
    @contextlib.contextmanager
    def attached(self, tap: Tap) -> Iterator[None]:
        """Install every tap for one prefill or decode call; everything is removed on exit."""
        with contextlib.ExitStack() as stack:
            for name, path, is_input in self._modules:
                stack.enter_context(self._module_hook(tap, name, path, is_input))
            for (owner, attr), patterns in self._functions.items():
                stack.enter_context(self._function_patch(tap, owner, attr, patterns))
            if self._weights:
                stack.enter_context(_WeightMode(self, tap))
            yield

    @contextlib.contextmanager
    def _module_hook(self, tap: Tap, name: str, path: str, is_input: bool) -> Iterator[None]:
        try:
            module = self.root.get_submodule(path)
        except AttributeError as exc:
            raise ValueError(f"TorchTaps: tap {name}: no submodule {path!r} ({exc})") from None
        if is_input:
            def pre(mod, args):  # type: ignore[no-untyped-def]
                return (self._hand_over(tap, name, args[0]), *args[1:])
            handle = module.register_forward_pre_hook(pre)
        else:
            def post(mod, args, out):  # type: ignore[no-untyped-def]
                if isinstance(out, tuple):
                    return (self._hand_over(tap, name, out[0]), *out[1:])
                return self._hand_over(tap, name, out)
            handle = module.register_forward_hook(post)
        try:
            yield
        finally:
            handle.remove()

    @contextlib.contextmanager
    def _function_patch(self, tap: Tap, owner: Any, attr: str, patterns: list[Any]) -> Iterator[None]:
        original = getattr(owner, attr)
        calls = [0]

        @functools.wraps(original)
        def wrapper(*args, **kwargs):  # type: ignore[no-untyped-def]
            out = original(*args, **kwargs)
            k = calls[0]
            calls[0] += 1
            layer = k // len(patterns)
            pattern = patterns[k % len(patterns)]
            if isinstance(pattern, tuple):
                if not isinstance(out, tuple) or len(out) != len(pattern):
                    raise ValueError(f"TorchTaps: {attr} returned {type(out).__name__}, pattern {pattern} needs "
                                     f"a tuple of {len(pattern)}")
                return tuple(v if p is None else self._hand_over(tap, p.format(i=layer), v) for p, v in zip(pattern, out))
            return out if pattern is None else self._hand_over(tap, pattern.format(i=layer), out)

        setattr(owner, attr, wrapper)
        try:
            yield
        finally:
            setattr(owner, attr, original)


def _torch_function_mode() -> type:
    from torch.overrides import TorchFunctionMode

    return TorchFunctionMode


class _WeightMode:
    """A TorchFunctionMode that taps the result of every op consuming a registered weight."""

    def __init__(self, taps: TorchTaps, tap: Tap):
        import torch

        base = _torch_function_mode()
        outer = self

        class Mode(base):  # type: ignore[misc, valid-type]
            def __torch_function__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
                kwargs = kwargs or {}
                fname = getattr(func, "__name__", "")
                role = "product" if fname in _PRODUCT_NAMES else "lookup" if fname in _LOOKUP_NAMES else None
                if role is None:
                    return func(*args, **kwargs)
                roles = [outer.taps._weights.get(TorchTaps._key(a), {}) for a in list(args) + list(kwargs.values())
                         if isinstance(a, torch.Tensor)]
                feeds = next((r["input"] for r in roles if "input" in r), None)
                if role == "product" and feeds is not None and args and isinstance(args[0], torch.Tensor) \
                        and "input" not in outer.taps._weights.get(TorchTaps._key(args[0]), {}):
                    args = (outer.taps._hand_over(outer.tap, feeds, args[0]), *args[1:])
                out = func(*args, **kwargs)
                name = next((r[role] for r in roles if role in r), None)
                if name is not None and isinstance(out, torch.Tensor):
                    return outer.taps._hand_over(outer.tap, name, out)
                return out

        self.taps, self.tap, self.mode = taps, tap, Mode()

    def __enter__(self) -> None:
        self.mode.__enter__()

    def __exit__(self, *exc: Any) -> None:
        self.mode.__exit__(*exc)


# Hugging Face parameter names -> the tap of the op that consumes them (the contract's weights dict).
HF_WEIGHT_TAPS: dict[str, str] = {
    "model.embed_tokens.weight": "embed",
    "model.layers.{i}.input_layernorm.weight": "layers.{i}.attn_norm",
    "model.layers.{i}.self_attn.q_proj.weight": "layers.{i}.q",
    "model.layers.{i}.self_attn.k_proj.weight": "layers.{i}.k",
    "model.layers.{i}.self_attn.v_proj.weight": "layers.{i}.v",
    "model.layers.{i}.self_attn.q_norm.weight": "layers.{i}.q_norm",
    "model.layers.{i}.self_attn.k_norm.weight": "layers.{i}.k_norm",
    "model.layers.{i}.self_attn.o_proj.weight": "layers.{i}.o",
    "model.layers.{i}.post_attention_layernorm.weight": "layers.{i}.ffn_norm",
    "model.layers.{i}.mlp.gate_proj.weight": "layers.{i}.gate",
    "model.layers.{i}.mlp.up_proj.weight": "layers.{i}.up",
    "model.layers.{i}.mlp.down_proj.weight": "layers.{i}.down",
    "model.norm.weight": "final_norm",
    "lm_head.weight": "logits",
}


# ... and the taps that are the input of a weight's op.
HF_INPUT_TAPS: dict[str, str] = {
    "model.layers.{i}.self_attn.o_proj.weight": "layers.{i}.attn",
    "model.layers.{i}.mlp.down_proj.weight": "layers.{i}.act",
}


def hf_weight_taps(num_layers: int, tensors: Mapping[str, Any], *, tied: bool = False,
                   inputs: bool = True) -> dict[str, list[Any]]:
    """``weights=`` for ``TorchTaps`` from tensors kept under Hugging Face parameter names (those
    absent from ``tensors`` are skipped); ``tied``: the embedding also makes the logits; ``inputs``:
    the attention context and ``act`` as the inputs of o_proj and down_proj."""
    out: dict[str, list[Any]] = {}
    for param, tap in [*HF_WEIGHT_TAPS.items(), *(HF_INPUT_TAPS.items() if inputs else ())]:
        found = [(tap_name, tensors.get(param.format(i=i) if i is not None else param))
                 for (tap_name, i) in expand(tap, num_layers)]
        found = [(n, t) for n, t in found if t is not None]
        for n, t in found:
            out[n] = [t]
    if tied and "model.embed_tokens.weight" in tensors and "logits" not in out:
        out["logits"] = [tensors["model.embed_tokens.weight"]]
    return out
