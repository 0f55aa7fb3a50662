"""
Compression, applied to a built GPT: which linear layers are replaced, by what, and how the
replacements start. model.py knows nothing of this; here its nn.Linear layers are swapped for
factored ones afterwards (the way gpt-fast's quantize.py swaps linears).

- The options: each method declares its own (a dataclass whose field names are the config keys
  users write: kron_shape, kron_factors, lowrank_rank, ...), with defaults and help.
- The spec: `resolve(config, **keys)` turns those keys into a typed Compression (a list of
  Targets: which layers, which method, its options), checked once against the model's matrix
  shapes. Everything after reads the spec; nothing re-derives it.
- `build(config, **keys)`: a fresh compressed GPT (random factors with GPT-2's spreads).
- `compress(model, **keys)`: a dense GPT's layers replaced by factors initialised from its
  weights (Van Loan, pruning, truncated SVD), or fitted to what the layers compute on
  calibration data (calib_tokens > 0: calibrate.py), with a per-layer report.

Adding a method is its layer, its options dataclass and one Method entry in METHODS.
"""
from __future__ import annotations

import json
import typing
from copy import deepcopy
from dataclasses import dataclass, field, fields
from fnmatch import fnmatchcase
from typing import Callable, Optional

import torch
import torch.nn as nn

import calibrate
from kronecker import INITS, KronLinear, a_shape_for, b_shape_for, rel_error, shape_pair, swap_hidden_order
from lowrank import LowRankLinear, SharedBasisLinear, init_shared_group, tie_bases
from model import GPT, LINEAR_NAMES, GPTConfig, init_std
from permute import PERMUTATION_OBJECTIVES, Searched, permuted


def option(default, help: str):
    return field(default=default, metadata={"help": help})


# -----------------------------------------------------------------------------
# The methods and their options

@dataclass(frozen=True)
class DenseOptions:
    pass


@dataclass(frozen=True)
class KronOptions:
    kron_shape: Optional[tuple] = option(None, "A (m1, n1) for c_fc (4 n_embd, n_embd); c_proj uses (n1, m1). "
                                               "Or set kron_b_shape")
    kron_b_shape: Optional[tuple] = option(None, "B (m2, n2) for c_fc, e.g. (2, 2) for the 81M class at any "
                                                 "width; c_proj uses (n2, m2)")
    kron_factors: int = option(1, "Kronecker factors k per matrix")
    kron_scalars: bool = option(False, "one trained scalar per factor")
    kron_init: str = option("vl-norm", "vl | vl-norm | prune | random, when compressing a trained model")
    kron_sparse: float = option(0.0, "also keep the largest fraction p of the residual W - W_hat as sparse values")
    prune_b_second: float = option(0.1, "prune's B = [1, prune_b_second]: the paper's text 0.1, its original code 0")

    def a_shape(self, out_features: int, in_features: int) -> tuple[int, int]:
        """A for a weight (out, in): kron_shape is A for the out >= in orientation (c_fc),
        kron_b_shape is B for it; the other orientation (c_proj) uses them transposed."""
        wide = out_features >= in_features
        if self.kron_shape is not None:
            m1, n1 = self.kron_shape
            return (m1, n1) if wide else (n1, m1)
        m2, n2 = self.kron_b_shape
        return a_shape_for((out_features, in_features), (m2, n2) if wide else (n2, m2), self.kron_factors)


@dataclass(frozen=True)
class LowRankOptions:
    lowrank_rank: Optional[int] = option(None, "rank of lowrank, basis size of shared "
                                               "(`python lowrank.py plan-rank` matches a Kronecker size)")


@dataclass(frozen=True)
class SharedOptions(LowRankOptions):
    share_group: int = option(2, "shared: consecutive (selected) layers per basis")


def check_kron(o: KronOptions, shape: tuple[int, int], where: str) -> None:
    """The factor shapes tile the weight (out, in), and prune gets the one shape it works with."""
    if o.kron_shape is None and o.kron_b_shape is None:
        raise ValueError(f"{where}mlp='kron' needs kron_shape=(m1, n1), the shape of A for c_fc, or "
                         "kron_b_shape=(m2, n2), the shape of B; see `python kronecker.py plan`")
    if o.kron_shape is not None and o.kron_b_shape is not None:
        raise ValueError(f"{where}set only one of kron_shape={o.kron_shape} (A) and kron_b_shape={o.kron_b_shape} "
                         "(B): each fixes the other")
    if not isinstance(o.kron_factors, int) or o.kron_factors < 1:
        raise ValueError(f"{where}kron_factors={o.kron_factors!r} must be a positive integer")
    if o.kron_init not in INITS:
        raise ValueError(f"{where}unknown kron_init {o.kron_init!r}; choose one of {', '.join(INITS)}")
    if not 0.0 <= o.kron_sparse <= 1.0:
        raise ValueError(f"{where}kron_sparse={o.kron_sparse} must be a fraction in [0, 1]")
    a = o.a_shape(*shape)
    b = b_shape_for(shape, a, o.kron_factors)
    if o.kron_init == "prune" and (o.kron_factors != 1 or b not in ((2, 1), (1, 2))):
        raise ValueError(f"{where}kron_init='prune' needs one factor with B of shape (2, 1) or (1, 2) "
                         f"(kron_b_shape=(2, 1) or (1, 2)); a matrix {shape} gets A {a}, B {b}, k={o.kron_factors}")


def check_rank(o: LowRankOptions, shape: tuple[int, int], where: str) -> None:
    if o.lowrank_rank is None:
        raise ValueError(f"{where}this method needs lowrank_rank; `python lowrank.py plan-rank` gives the rank "
                         "matching a Kronecker size")
    if not isinstance(o.lowrank_rank, int) or isinstance(o.lowrank_rank, bool) or o.lowrank_rank < 1:
        raise ValueError(f"{where}lowrank_rank={o.lowrank_rank!r} must be a positive integer")
    if isinstance(o, SharedOptions) and (not isinstance(o.share_group, int) or o.share_group < 1):
        raise ValueError(f"{where}share_group={o.share_group!r} must be a positive integer")


def build_kron(o: KronOptions, in_features: int, out_features: int, bias: bool) -> KronLinear:
    return KronLinear(in_features, out_features, o.a_shape(out_features, in_features), o.kron_factors,
                      bias=bias, scalars=o.kron_scalars, sparse=o.kron_sparse)


def init_kron(layer: KronLinear, W: torch.Tensor, o: KronOptions, svd: str) -> None:
    # random: the spread of the dense layer it replaces
    layer.init_from_weight(W, o.kron_init, svd, prune_b_second=o.prune_b_second, random_std=W.float().std().item())


@torch.no_grad()
def fit_kron(layer: KronLinear, W: torch.Tensor, C: torch.Tensor, o: KronOptions, damping: float) -> None:
    """The factors that minimise the output error on inputs of second moment C, from Van Loan
    (vl and vl-norm alike: the fit sets the scale, so no norm correction follows); scalars 1; a
    sparse residual keeps the entries that add most to the output error."""
    A, B, _ = calibrate.kron_fit(W, C, layer.a_shape, layer.k, damping=damping)
    layer.A.copy_(A)
    layer.B.copy_(B)
    if layer.scalars is not None:
        layer.scalars.fill_(1.0)
    if layer.sparse is not None:
        R = W.to(layer.A.dtype) - layer.materialize()
        layer.sparse.init_from_residual(R, calibrate.calibrated_residual_scores(R, C))


@torch.no_grad()
def fit_lowrank(layer: LowRankLinear, W: torch.Tensor, C: torch.Tensor, o: LowRankOptions, damping: float) -> None:
    U, V = calibrate.lowrank_fit(W, C, layer.rank, damping)
    layer.U.copy_(U)
    layer.V.copy_(V)


@torch.no_grad()
def fit_shared_group(layers: list[SharedBasisLinear], weights: list, moments: list, damping: float) -> None:
    coefficients, basis = calibrate.shared_basis_fit(weights, moments, layers[0].rank, damping)
    layers[0].basis.copy_(basis)
    for layer, K in zip(layers, coefficients):
        layer.coefficient.copy_(K)


@dataclass(frozen=True)
class Method:
    """A compression method: its options, the check of those options against one weight shape
    (out, in), how its layer is built, how it starts from the dense weight it replaces, and how
    it is fitted to calibration data (the input second moment C of that weight)."""
    options: type
    build: Callable[[object, int, int, bool], nn.Module]          # (options, in, out, bias) -> layer
    check: Optional[Callable[[object, tuple, str], None]] = None  # (options, (out, in), where)
    init: Optional[Callable[[nn.Module, torch.Tensor, object, str], None]] = None   # (layer, W, options, svd)
    fit: Optional[Callable[[nn.Module, torch.Tensor, torch.Tensor, object, float], None]] = None  # (.., C, .., damping)
    # layers that share tensors (one basis per group) are set together instead: (layers, weights[, moments, damping])
    init_group: Optional[Callable[[list, list], None]] = None
    fit_group: Optional[Callable[[list, list, list, float], None]] = None


METHODS = {
    "dense": Method(DenseOptions, build=lambda o, i, out, bias: nn.Linear(i, out, bias=bias)),
    "kron": Method(KronOptions, build=build_kron, check=check_kron, init=init_kron, fit=fit_kron),
    "lowrank": Method(LowRankOptions, check=check_rank,
                      build=lambda o, i, out, bias: LowRankLinear(i, out, o.lowrank_rank, bias=bias),
                      init=lambda layer, W, o, svd: layer.init_from_weight(W), fit=fit_lowrank),
    "shared": Method(SharedOptions, check=check_rank,
                     build=lambda o, i, out, bias: SharedBasisLinear(i, out, o.lowrank_rank, bias=bias),
                     init_group=init_shared_group, fit_group=fit_shared_group),
}


# -----------------------------------------------------------------------------
# The keys users write, and the spec they resolve to

PERMUTE_OPTIONS = (None, "hidden", "hidden+residual")
SIDES = {"kron_shape": "(m1, n1)", "kron_b_shape": "(m2, n2)"}
# keys that are not options of one method: which method the MLPs get, the targets, the permutation
GENERAL_KEYS = {
    "mlp": ("dense", str, "MLP method: " + " | ".join(METHODS)),
    "compress_targets": ((), tuple, "list of dicts choosing any linears and layers to compress (docs/extensions.md)"),
    "kron_permute": (None, Optional[str], "None | 'hidden' | 'hidden+residual': free permutations that lower the "
                                          "Van Loan error first"),
    "calib_tokens": (0, int, "fit the factors to the teacher's activations on this many training tokens "
                             "(0: off, the weights alone)"),
    "calib_sequential": (False, bool, "fit each layer to the teacher's outputs on the inputs of the "
                                      "already-compressed layers before it (what the compressed model will see)"),
    "calib_damping": (1e-2, float, "damping of the calibrated fits (x mean input energy): larger is closer "
                                   "to the weight-error fit"),
}


def _option_keys() -> dict[str, tuple]:
    keys = {}
    for method in METHODS.values():
        hints = typing.get_type_hints(method.options)
        for f in fields(method.options):
            keys.setdefault(f.name, (f.default, hints[f.name], f.metadata["help"]))
    return keys


# every compression key: (default, type, help); the one place their help is written
KEYS = {**GENERAL_KEYS, **_option_keys()}
OPTION_KEYS = tuple(k for k in KEYS if k not in GENERAL_KEYS)
# keys that say how the factors start, not what they are: a checkpoint may differ in them
INIT_ONLY = ("kron_init", "prune_b_second", "kron_permute", "calib_tokens", "calib_sequential", "calib_damping")


@dataclass(frozen=True)
class Target:
    """One rule: the linears `pattern` (a glob over LINEAR_NAMES) of `layers` ("all", "odd", "even"
    or a tuple of indices) become `method` with `options` (that method's options dataclass)."""
    pattern: str
    layers: object
    method: str
    options: object

    def selects(self, layer: int, name: str, n_layer: int) -> bool:
        return fnmatchcase(name, self.pattern) and layer in selected_layers(self.layers, n_layer)


@dataclass
class Compression:
    """A model's compression, resolved: `keys` are every compression key with its value (what
    checkpoints store and configs compare), `targets` the typed rules they mean, first match
    wins (the MLP rule from mlp and the option keys is the last)."""
    keys: dict
    targets: tuple

    def target(self, layer: int, name: str, n_layer: int) -> Target | None:
        """The rule that decides block `layer`'s linear `name`, or None: it stays dense."""
        return next((t for t in self.targets if t.selects(layer, name, n_layer)), None)

    @property
    def permute(self) -> str | None:
        return self.keys["kron_permute"]

    @property
    def calib_tokens(self) -> int:
        return self.keys["calib_tokens"]

    def architecture(self) -> dict:
        """The keys that fix tensors: two specs with equal architectures hold the same ones."""
        keys = {k: v for k, v in self.keys.items() if k not in INIT_ONLY}
        keys["compress_targets"] = [{k: v for k, v in t.items() if k not in INIT_ONLY}
                                    for t in keys["compress_targets"]]
        return keys


def selected_layers(layers, n_layer: int) -> list[int]:
    if layers == "all":
        return list(range(n_layer))
    if layers in ("odd", "even"):
        return list(range(1 if layers == "odd" else 0, n_layer, 2))
    return list(layers)


def _target(t: dict, keys: dict, config: GPTConfig, where: str) -> Target:
    """A target dict (options default to the top-level keys), checked against the model's shapes."""
    if not isinstance(t, dict):
        raise ValueError(f"a compress target is a dict like {{'pattern': 'mlp.c_fc', 'layers': 'odd', "
                         f"'method': 'kron', 'kron_shape': [1536, 384]}}, got {t!r}")
    unknown = set(t) - {"pattern", "layers", "method", *OPTION_KEYS}
    if unknown:
        raise ValueError(f"unknown compress target keys {sorted(unknown)}; known: pattern, layers, method, "
                         + ", ".join(OPTION_KEYS))
    pattern = t.get("pattern", "")
    names = [n for n in LINEAR_NAMES if fnmatchcase(n, pattern)]
    if not names:
        raise ValueError(f"target pattern {pattern!r} selects none of {', '.join(LINEAR_NAMES)} (globs like 'mlp.*' work)")
    layers = t.get("layers", "all")
    if isinstance(layers, str):
        if layers not in ("all", "odd", "even"):
            raise ValueError(f"target layers {layers!r}: use 'all', 'odd', 'even' or a list of layer indices")
    else:
        layers = tuple(sorted(int(i) for i in layers))
        if any(not 0 <= i < config.n_layer for i in layers):
            raise ValueError(f"target layers {list(layers)}: indices must be in 0..{config.n_layer - 1}")
    method = t.get("method")
    if method not in METHODS:
        raise ValueError(f"unknown {f'{where}method' if where else 'mlp'} {method!r}; choose one of {tuple(METHODS)}")
    # a target that sets one of the two shape keys does not inherit the other
    own_shape = t.get("kron_shape") is not None or t.get("kron_b_shape") is not None
    values = {}
    for f in fields(METHODS[method].options):
        inherit = not (own_shape and f.name in ("kron_shape", "kron_b_shape"))
        values[f.name] = t[f.name] if f.name in t else (keys[f.name] if inherit else None)
        if f.name in ("kron_shape", "kron_b_shape") and values[f.name] is not None:
            values[f.name] = shape_pair(values[f.name], f.name, SIDES[f.name], where, positive=True)
    options = METHODS[method].options(**values)
    check = METHODS[method].check
    if check is not None:
        shapes = config.linear_shapes()
        for name in names:                      # every matrix this target selects must fit
            check(options, shapes[name], f"{where}{name}: " if where else "")
    return Target(pattern, layers, method, options)


def resolve(config: GPTConfig, **keys) -> Compression:
    """The compression `keys` ask for on a model of `config`, checked: unknown keys, types, ranges,
    and every factor shape against the matrices it replaces. ValueError naming the key."""
    unknown = set(keys) - set(KEYS)
    if unknown:
        raise ValueError(f"unknown compression keys {sorted(unknown)}; known: {', '.join(KEYS)}")
    keys = {k: keys.get(k, default) for k, (default, _, _) in KEYS.items()}
    for k in ("kron_shape", "kron_b_shape"):      # kept as lists, as JSON and checkpoints hold them
        keys[k] = None if keys[k] is None else list(shape_pair(keys[k], k, SIDES[k], positive=True))
    targets = keys["compress_targets"]
    if isinstance(targets, str):     # from a command line: JSON
        targets = json.loads(targets)
    keys["compress_targets"] = [{k: list(v) if isinstance(v, tuple) else v for k, v in t.items()}
                                if isinstance(t, dict) else t for t in targets or ()]
    if keys["kron_permute"] not in PERMUTE_OPTIONS:
        raise ValueError(f"kron_permute={keys['kron_permute']!r}; choose None, 'hidden' or 'hidden+residual'")
    if not isinstance(keys["calib_tokens"], int) or isinstance(keys["calib_tokens"], bool) or keys["calib_tokens"] < 0:
        raise ValueError(f"calib_tokens={keys['calib_tokens']!r} must be a whole number of tokens >= 0 (0: off)")
    if not keys["calib_damping"] >= 0:
        raise ValueError(f"calib_damping={keys['calib_damping']!r} must be >= 0 (the fits use 1e-2)")
    own = tuple(_target(t, keys, config, f"target {t.get('pattern')!r}: ") for t in keys["compress_targets"])
    mlps = _target({"pattern": "mlp.*", "layers": "all", "method": keys["mlp"]}, keys, config, "")
    spec = Compression(keys, own + (mlps,))
    if spec.calib_tokens:
        for t in spec.targets:
            if t.method == "kron" and t.options.kron_init not in ("vl", "vl-norm"):
                raise ValueError(f"calib_tokens={spec.calib_tokens} fits Kronecker factors from Van Loan: use "
                                 f"kron_init 'vl' or 'vl-norm', not {t.options.kron_init!r}")
    if spec.permute and not any(t.method == "kron" and t.options.kron_init in PERMUTATION_OBJECTIVES
                                and fnmatchcase("mlp.c_fc", t.pattern) for t in spec.targets):
        raise ValueError(f"kron_permute={spec.permute!r} reorders the MLPs for a Van Loan init: it needs "
                         "Kronecker MLPs with kron_init 'vl' or 'vl-norm'")
    return spec


def spec_of(model: GPT) -> Compression:
    """The compression applied to `model` (a model straight from model.py: none)."""
    return getattr(model, "compression", None) or resolve(model.config)


def architecture(model_or_config, spec: Compression | None = None) -> dict:
    """What a model is, as a dict: its dimensions and the compression keys that fix tensors (two
    models with equal architectures hold the same tensors)."""
    if isinstance(model_or_config, GPT):
        config, spec = model_or_config.config, spec_of(model_or_config)
    else:
        config, spec = model_or_config, spec or resolve(model_or_config)
    dims = {k: v for k, v in config.to_dict().items() if k != "dropout"}
    return {**dims, **spec.architecture()}


# -----------------------------------------------------------------------------
# Applying a spec to a built GPT

def shared_groups(spec: Compression, n_layer: int) -> list[list[tuple[int, str]]]:
    """(layer, name) groups that share one basis: the layers a "shared" target selects for one
    name, in order, cut into runs of share_group."""
    members: dict[tuple, list[int]] = {}
    for layer in range(n_layer):
        for name in LINEAR_NAMES:
            t = spec.target(layer, name, n_layer)
            if t is not None and t.method == "shared":
                members.setdefault((name, spec.targets.index(t), t.options.share_group), []).append(layer)
    return [[(layer, name) for layer in layers[i:i + g]]
            for (name, _, g), layers in members.items() for i in range(0, len(layers), g)]


def swap_linears_(model: GPT, spec: Compression) -> list[tuple[int, str, nn.Module, nn.Linear]]:
    """Replace every linear the spec compresses by its method's layer (factors drawn at random
    with GPT-2's spread for that layer, bias zero). Returns (layer, name, new, old) for each."""
    n_layer = model.config.n_layer
    swapped = []
    for i, block in enumerate(model.transformer.h):
        for name in LINEAR_NAMES:
            t = spec.target(i, name, n_layer)
            if t is None or t.method == "dense":
                continue
            old = block.get_submodule(name)
            if not isinstance(old, nn.Linear):
                raise ValueError(f"h.{i}.{name} is already compressed ({type(old).__name__}); compress a dense GPT")
            new = METHODS[t.method].build(t.options, old.in_features, old.out_features, old.bias is not None)
            new.to(device=old.weight.device, dtype=old.weight.dtype)
            new.init_random(init_std(name, n_layer))
            parent, attr = name.split(".")
            setattr(block.get_submodule(parent), attr, new)
            swapped.append((i, name, new, old))
    for group in shared_groups(spec, n_layer):   # cross-layer basis sharing: one tensor per group
        tie_bases([model.transformer.h[layer].get_submodule(name) for layer, name in group])
    for block in model.transformer.h:
        # Kronecker layers of B 3x3 or 2x2 pass the hidden features in the order their factors
        # compute them in, which saves two strided copies of the hidden activation per layer
        swap_hidden_order(block.mlp.c_fc, block.mlp.c_proj)
    model.compression = spec
    return swapped


def build(config: GPTConfig, spec: Compression | None = None, **keys) -> GPT:
    """A fresh GPT of `config` compressed by `spec` (or by compression `keys`, e.g. mlp="kron",
    kron_shape=(1536, 384)): GPT-2's init, the factored layers with factors whose product has the
    spread of the dense layer they replace (whatever their number of factors)."""
    if spec is None:
        spec = resolve(config, **keys)
    elif keys:
        raise ValueError("build() takes a spec or compression keys, not both")
    model = GPT(config)
    swap_linears_(model, spec)
    return model


# -----------------------------------------------------------------------------
# Compressing a trained GPT

@dataclass
class LayerReport:
    layer: int
    name: str               # "mlp.c_fc", "mlp.c_proj", "attn.c_proj", ...
    rel_error: float        # ||W - W_hat||_F / ||W||_F  (W_hat includes a sparse residual)
    retained_norm: float    # 100 * ||W_hat||_F / ||W||_F
    # with kron_permute: the same two without the permutation, for comparison
    rel_error_unpermuted: Optional[float] = None
    retained_norm_unpermuted: Optional[float] = None
    # with calibration: sqrt(tr(E C E^T) / tr(W C W^T)), E = W - W_hat, C the inputs' second moment
    output_error: Optional[float] = None


def searched_matrices(spec: Compression, config: GPTConfig) -> list[Searched]:
    """The MLP matrices a permutation search lowers the error of: those the spec initialises
    with Van Loan."""
    found = []
    for i in range(config.n_layer):
        for name in ("mlp.c_fc", "mlp.c_proj"):
            t = spec.target(i, name, config.n_layer)
            if t is not None and t.method == "kron" and t.options.kron_init in PERMUTATION_OBJECTIVES:
                a_shape = t.options.a_shape(*config.linear_shapes()[name])
                found.append(Searched(i, name, a_shape, t.options.kron_factors, t.options.kron_init))
    return found


def compress(model: GPT, spec: Compression | None = None, *, svd: str = "exact", verbose: bool = False,
             calib_data=None, calib_batch_size: int = 8, progress: bool = True,
             **keys) -> tuple[GPT, list[LayerReport]]:
    """A copy of the dense `model` whose linears `spec` (or compression `keys`, e.g. mlp="kron",
    kron_shape=(1536, 384)) selects are replaced by factors initialised from its weights, each by
    its method's init; everything else (embeddings, LayerNorms, biases, layers left dense) is
    copied bit-identically. With keys and no mlp, mlp is "kron" (or "dense" when compress_targets
    are given). Returns the model and a per-layer report (the paper's Table 4 view).

    With calib_tokens > 0 the factors are fitted to what each layer computes instead (calibrate.py):
    `calib_data` (a 1-D array of token ids, e.g. a train.bin memmap) gives calib_tokens tokens in
    windows of the model's block size, and the report adds each layer's output error."""
    if spec is None:
        keys.setdefault("mlp", "dense" if keys.get("compress_targets") else "kron")
        spec = resolve(model.config, **keys)
    elif keys:
        raise ValueError("compress() takes a spec or compression keys, not both")
    if spec.calib_tokens and calib_data is None:
        raise ValueError(f"calib_tokens={spec.calib_tokens} needs calibration data (token ids of the training "
                         "split); train.py takes them from data_dir's train.bin, compress() from calib_data")
    if spec.permute:
        source = permuted(model, searched_matrices(spec, model.config), residual=spec.permute == "hidden+residual",
                          svd=svd)
    else:
        source = model
    new = deepcopy(source)
    swapped = swap_linears_(new, spec)
    if spec.calib_tokens:
        moments = calibrate_(new, source, swapped, spec, calib_data, calib_batch_size, progress)
    else:
        moments = None
        init_(new, spec, swapped, svd)
    report = compression_report(source, new, moments)
    if spec.permute:     # the same layers initialised without the permutation, for comparison
        plain_spec = resolve(model.config, **{**spec.keys, "kron_permute": None, "calib_tokens": 0})
        plain = compression_report(model, compress(model, plain_spec, svd=svd)[0])
        for r, p in zip(report, plain):
            r.rel_error_unpermuted, r.retained_norm_unpermuted = p.rel_error, p.retained_norm
    if verbose:
        print(format_report(report))
    return new, report


@torch.no_grad()
def init_(model: GPT, spec: Compression, swapped: list, svd: str) -> None:
    """Each swapped layer from the dense weight it replaced, by its method's init; biases copied."""
    groups: dict[int, tuple[Method, list, list]] = {}
    for i, name, layer, dense in swapped:
        target = spec.target(i, name, model.config.n_layer)
        method = METHODS[target.method]
        if method.init_group is not None:    # one init per group of layers sharing a tensor
            _, layers, weights = groups.setdefault(id(layer.basis), (method, [], []))
            layers.append(layer)
            weights.append(dense.weight.detach())
        else:
            method.init(layer, dense.weight.detach(), target.options, svd)
        if dense.bias is not None:
            layer.bias.copy_(dense.bias)
    for method, layers, weights in groups.values():
        method.init_group(layers, weights)


def calibrate_(model: GPT, source: GPT, swapped: list, spec: Compression, tokens, batch_size: int,
               progress: bool) -> dict[str, torch.Tensor]:
    """Fit each swapped layer to the input second moment C of the layer it replaces: collected on
    the dense `source` in one pass, or (calib_sequential) layer by layer on `model` itself, whose
    earlier layers are then already fitted. Returns {"transformer.h.i.name": C}."""
    n_layer, damping = model.config.n_layer, spec.keys["calib_damping"]
    names = [f"transformer.h.{i}.{name}" for i, name, _, _ in swapped]
    vocab = model.config.vocab_size

    def windows():
        for idx in calibrate.calibration_windows(tokens, spec.calib_tokens, model.config.block_size, batch_size,
                                                 progress=progress):
            if int(idx.max()) >= vocab:      # before the embedding fails on it: data of another tokenizer
                raise ValueError(f"the calibration data holds token id {int(idx.max())}, beyond the teacher's "
                                 f"vocabulary ({vocab}): calibrate on data of the teacher's tokenizer")
            yield idx
    for block in model.transformer.h:        # the moments are of inputs in the standard order
        if isinstance(block.mlp.c_fc, KronLinear) and isinstance(block.mlp.c_proj, KronLinear):
            block.mlp.c_fc.swap_out = block.mlp.c_proj.swap_in = False
    sequential = spec.keys["calib_sequential"]
    if sequential and any(t.method == "shared" for t in spec.targets):   # a basis is fitted for its whole group
        raise ValueError("calib_sequential fits one layer after another: use calib_sequential=False with 'shared'")
    moments = {} if sequential else {n: m.second_moment() for n, m in
                                     calibrate.collect_moments(source, names, windows()).items()}
    groups: dict[int, tuple[Method, list, list, list]] = {}
    with torch.no_grad():
        for (i, name, layer, dense), full in zip(swapped, names):
            W = dense.weight.detach()
            if sequential:       # the teacher's outputs, on the inputs the layers compressed so far give
                if progress:
                    print(f"calibrating {full} on the inputs of the layers compressed before it")
                moments[full], cross = calibrate.collect_cross_moments(source, model, full, windows())
                W = calibrate.teacher_target(W, moments[full], cross, damping)
            target = spec.target(i, name, n_layer)
            method = METHODS[target.method]
            C = moments[full]
            if method.fit_group is not None:
                _, layers, weights, Cs = groups.setdefault(id(layer.basis), (method, [], [], []))
                layers.append(layer)
                weights.append(W)
                Cs.append(C)
            else:
                method.fit(layer, W, C, target.options, damping)
            if dense.bias is not None:
                layer.bias.copy_(dense.bias)
        for method, layers, weights, Cs in groups.values():
            method.fit_group(layers, weights, Cs, damping)
    for block in model.transformer.h:
        swap_hidden_order(block.mlp.c_fc, block.mlp.c_proj)
    return moments


def dense_weight(layer: nn.Module) -> torch.Tensor:
    """The (out, in) weight a layer applies: factors multiplied out, plus a Kronecker layer's
    sparse residual (for reports and exports; forward never does this)."""
    if isinstance(layer, nn.Linear):
        return layer.weight
    W = layer.materialize()
    sparse = getattr(layer, "sparse", None)
    return W if sparse is None else W + sparse.to_dense().to(W.dtype)


@torch.no_grad()
def compression_report(dense: GPT, compressed: GPT, moments: dict | None = None) -> list[LayerReport]:
    """Relative error and retained norm of every compressed linear against the dense one, and its
    relative output error on inputs of second moment moments["transformer.h.i.name"] where given."""
    report = []
    for i, (old, blk) in enumerate(zip(dense.transformer.h, compressed.transformer.h)):
        for name in LINEAR_NAMES:
            layer = blk.get_submodule(name)
            if isinstance(layer, nn.Linear):
                continue
            W, W_hat = old.get_submodule(name).weight.float(), dense_weight(layer).float()
            C = (moments or {}).get(f"transformer.h.{i}.{name}")
            report.append(LayerReport(i, name, rel_error(W, W_hat), 100 * (W_hat.norm() / W.norm()).item(),
                                      output_error=None if C is None else calibrate.output_error(W, W_hat, C)))
    return report


def format_report(report: list[LayerReport]) -> str:
    permuted_too = any(r.rel_error_unpermuted is not None for r in report)
    calibrated = any(r.output_error is not None for r in report)
    head = "| layer | matrix | rel. Frobenius error | retained norm % |"
    lines = [head + (" error without permutation | retained without |" if permuted_too else "")
             + (" rel. output error |" if calibrated else ""),
             "|---|---|---|---|" + ("---|---|" if permuted_too else "") + ("---|" if calibrated else "")]
    for r in report:
        line = f"| {r.layer} | {r.name} | {r.rel_error:.4f} | {r.retained_norm:.2f} |"
        if permuted_too:
            line += f" {r.rel_error_unpermuted:.4f} | {r.retained_norm_unpermuted:.2f} |"
        if calibrated:
            line += f" {r.output_error:.4f} |"
        lines.append(line)
    return "\n".join(lines)
