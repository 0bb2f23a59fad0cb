"""Mechanistic interpretability at the named sites of a forward pass: cache, patch, read attention. No hooks.

Every block calls `sites(name, value)` at its sites and continues with what comes back (see `Sites` in
`layers.py` and the site list at the top of `flux1.py`). The classes here are such `sites` objects: they keep
the values a caller asked for and replace or transform others, so the code a researcher reads is the code
that runs. Names are full paths (`double_blocks.3.img_attn`); requests may use glob patterns
(`double_blocks.*.img`). Any model whose forward (or `layers`) takes `sites=` works; its modules declare
their sites in a `SITES` tuple, which is how unknown names are refused before the model runs.

    output, cache = run_with_cache(model, *inputs, names=["double_blocks.*.img"])
    output = run_with_patches(model, *inputs, patches={"double_blocks.2.img_attn": ablate_heads([1], 24)})
    weights = attention_weights(model, *inputs, layers=[0, 5], queries="img", keys="txt")  # layer -> (B, H, L, T)
"""

from __future__ import annotations

import difflib
import inspect
import re
from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from fnmatch import fnmatchcase

import torch
from torch import Tensor, nn

from flux_mini.layers import NO_SITES, ConceptStream, Sites, upcast

Patch = Tensor | float | Callable[[Tensor], Tensor]
Patches = Mapping[str, Patch]

# ----------------------------------------------------------------------------------------------
# Site names


def site_names(model: nn.Module) -> list[str] | None:
    """Every site of `model` in the order a forward visits them: each module's `SITES` under its module
    name (the model scopes its blocks by the same names). None when no module declares its sites."""
    names = [
        f"{prefix}.{site}" if prefix else site
        for prefix, module in model.named_modules()
        for site in getattr(type(module), "SITES", ())
    ]
    return names or None


def describe_sites(names: Iterable[str]) -> str:
    """A compact listing: `double_blocks.{0..18}.{q, k, ...}` instead of hundreds of names."""
    groups: dict[str, tuple[list[int], list[str]]] = {}
    for name in names:
        match = re.fullmatch(r"(.*?)\.(\d+)\.([^.]+)", name)
        prefix, index, site = match.groups() if match else ("", None, name)
        indices, sites = groups.setdefault(prefix, ([], []))
        if index is not None and int(index) not in indices:
            indices.append(int(index))
        if site not in sites:
            sites.append(site)
    lines = []
    for prefix, (indices, sites) in groups.items():
        if not prefix:
            lines.append(", ".join(sites))
        else:
            lines.append(f"{prefix}.{{{min(indices)}..{max(indices)}}}.{{{', '.join(sites)}}}")
    return "; ".join(lines)


class SiteSelection:
    """Names and glob patterns, matched against the names a forward visits (memoised per name).

    With the model's site list, a request that matches no site is refused up front; `unvisited()` then
    names requests that matched no site *visited* (e.g. concept sites without a concept stream)."""

    def __init__(self, patterns: Iterable[str], valid: list[str] | None, what: str):
        self.patterns = list(patterns)
        for pattern in self.patterns:
            if not isinstance(pattern, str):
                raise TypeError(f"{what}: site names must be strings, got {pattern!r}")
        if valid is not None:
            for pattern in self.patterns:
                if not any(fnmatchcase(name, pattern) for name in valid):
                    close = difflib.get_close_matches(pattern, valid, n=3)
                    hint = f" Did you mean {', '.join(close)}?" if close else ""
                    raise ValueError(
                        f"{what}: {pattern!r} matches no site of this model.{hint} Valid sites: {describe_sites(valid)}"
                    )
        self.valid = valid
        self.visited: dict[str, str | None] = {}  # every name seen -> the first pattern it matches

    def match(self, name: str) -> str | None:
        try:
            return self.visited[name]
        except KeyError:
            pattern = next((p for p in self.patterns if fnmatchcase(name, p)), None)
            self.visited[name] = pattern
            return pattern

    def unvisited(self) -> list[str]:
        hit = set(self.visited.values())
        return [p for p in self.patterns if p not in hit]


def check_visited(selections: Iterable[SiteSelection], run: str = "this run") -> None:
    """Refuse requests that never met a site (after the run; nothing is silently left out)."""
    for selection in selections:
        if missing := selection.unvisited():
            seen = describe_sites(selection.visited) if selection.visited else "none"
            raise ValueError(
                f"{missing} matched no site visited in {run} (visited: {seen}). Concept sites are visited only "
                "when a concept stream runs (single blocks: with concepts_in_single_blocks); a run that stops "
                "early (compute_concept_maps, encode_image) does not reach later blocks."
            )


# ----------------------------------------------------------------------------------------------
# Sites that see full names


class NamedSites(Sites):
    """A `Sites` whose `visit(full_name, value)` sees `double_blocks.3.img` rather than `img`."""

    def __call__(self, name: str, value: Tensor) -> Tensor:
        return self.visit(name, value)

    def scoped(self, prefix: str) -> Sites:
        return ScopedSites(self, prefix)

    def visit(self, name: str, value: Tensor) -> Tensor:
        raise NotImplementedError


class ScopedSites(Sites):
    """What a block receives: its own names, forwarded to the root with the block's prefix."""

    __slots__ = ("root", "prefix")

    def __init__(self, root: NamedSites, prefix: str):
        self.root, self.prefix = root, prefix

    def __call__(self, name: str, value: Tensor) -> Tensor:
        return self.root.visit(f"{self.prefix}.{name}", value)

    def scoped(self, prefix: str) -> Sites:
        return ScopedSites(self.root, f"{self.prefix}.{prefix}")


# ----------------------------------------------------------------------------------------------
# Caching and patching


def apply_patch(name: str, value: Tensor, patch: Patch) -> Tensor:
    """A tensor (or number) replaces the value, broadcast to its shape; a function transforms it."""
    if callable(patch):
        new = patch(value)
        if not isinstance(new, Tensor) or new.shape != value.shape:
            got = tuple(new.shape) if isinstance(new, Tensor) else type(new).__name__
            raise ValueError(f"the patch function for {name} returned {got}; it must return a tensor of the site's "
                             f"shape {tuple(value.shape)}")  # fmt: skip
        return new
    patch = torch.as_tensor(patch)
    try:
        fits = torch.broadcast_shapes(patch.shape, value.shape) == value.shape
    except RuntimeError:
        fits = False
    if not fits:
        raise ValueError(
            f"the patch for {name} has shape {tuple(patch.shape)}, but the site holds {tuple(value.shape)}; pass a "
            "tensor of that shape (or one that broadcasts to it, e.g. a (D,) vector for mean ablation)"
        )
    return patch.to(value.device, value.dtype).expand_as(value)


class Interventions:
    """What to cache and what to patch, for one forward or for chosen steps of a pipeline.

    `sites(step)` is the `sites=` argument of one model call; the pipelines call it once per denoising step
    (or noise sample). Cached values land in `cache[step][name]`, after any patch at that site (what the
    model continued with); they keep their autograd graph when gradients are on. `patches` maps names or
    patterns to a replacement tensor, a number, or a function of the value; or it is a function of the step
    giving such a mapping (e.g. `lambda step: source.cache[step]` patches in another run, step by step).
    `steps` limits both to those steps (None: every step)."""

    def __init__(
        self,
        model: nn.Module | None,
        cache: Iterable[str] = (),
        patches: Patches | Callable[[int], Patches] | None = None,
        steps: Collection[int] | None = None,
    ):
        self.valid = site_names(model) if model is not None else None
        self.cache_names = SiteSelection([cache] if isinstance(cache, str) else cache, self.valid, "cache")
        self.patches = patches if callable(patches) else dict(patches or {})
        self.patch_names = None if callable(patches) else SiteSelection(self.patches, self.valid, "patches")
        self.steps = None if steps is None else set(steps)
        self.cache: dict[int, dict[str, Tensor]] = {}

    def sites(self, step: int = 0) -> Sites:
        if self.steps is not None and step not in self.steps:
            return NO_SITES
        if self.patch_names is not None:
            patches, patch_names = self.patches, self.patch_names
        else:
            patches = dict(self.patches(step))
            patch_names = SiteSelection(patches, self.valid, f"patches at step {step}")
        return InterventionSites(self.cache_names, self.cache.setdefault(step, {}), patch_names, patches)

    def check_visited(self, run: str = "this run") -> None:
        check_visited([self.cache_names] + ([self.patch_names] if self.patch_names is not None else []), run)


class InterventionSites(NamedSites):
    """One model call's sites: patch the matching sites, then keep the requested ones."""

    def __init__(self, cache_names: SiteSelection, cache: dict[str, Tensor], patch_names: SiteSelection, patches):
        self.cache_names, self.cache = cache_names, cache
        self.patch_names, self.patches = patch_names, patches

    def visit(self, name: str, value: Tensor) -> Tensor:
        if self.patches and (pattern := self.patch_names.match(name)) is not None:
            value = apply_patch(name, value, self.patches[pattern])
        if self.cache_names.match(name) is not None:
            self.cache[name] = value
        return value


def model_of(fn: Callable) -> nn.Module | None:
    """The model behind a forward-like callable: the module itself, a module's bound method, or None."""
    owner = fn if isinstance(fn, nn.Module) else getattr(fn, "__self__", None)
    return owner if isinstance(owner, nn.Module) else None


def run_with_cache(
    model: Callable, *args, names: Iterable[str], patches: Patches | None = None, **kwargs
) -> tuple[object, dict[str, Tensor]]:
    """`model(*args, **kwargs)` and the values at the sites `names` (names or glob patterns), after any `patches`
    (see `run_with_patches`): what the model continued with.

    `model` is the model or any function that takes `sites=` and whose owner or first module argument is
    the model: `model.layers` (run to the end, a list of its layers), `compute_concept_maps` with the model
    first. Without patches the output is bit-identical to the plain call; only the requested values are kept."""
    module = model_of(model) or next((a for a in args if isinstance(a, nn.Module)), None)
    interventions = Interventions(module, cache=names, patches=patches)
    output = fn_output(model(*args, sites=interventions.sites(), **kwargs))
    interventions.check_visited()
    return output, interventions.cache[0]


def run_with_patches(model: Callable, *args, patches: Patches, **kwargs):
    """`model(*args, **kwargs)` with the value at each site in `patches` replaced (tensor or number,
    broadcast to the site's shape) or transformed (a function of the value returning that shape)."""
    return run_with_cache(model, *args, names=(), patches=patches, **kwargs)[0]


def fn_output(output):
    """A generator (`Flux.layers`) runs to its end: its list of layers."""
    return list(output) if inspect.isgenerator(output) else output


def ablate_heads(heads: int | Sequence[int], num_heads: int, replacement: Tensor | None = None):
    """A patch for an attention-output site (B, L, H * Dh): the columns of `heads` set to zero, or to the
    same columns of `replacement` (mean ablation, or patching heads in from another run)."""
    heads = [heads] if isinstance(heads, int) else list(heads)
    if bad := [h for h in heads if not 0 <= h < num_heads]:
        raise ValueError(f"heads {bad} do not exist: there are {num_heads} heads (0..{num_heads - 1})")

    def patch(value: Tensor) -> Tensor:
        width = value.shape[-1]
        if width % num_heads:
            raise ValueError(f"a site of width {width} does not split into {num_heads} heads: patch an attention "
                             "output (img_attn, txt_attn, attn, concept_attn)")  # fmt: skip
        chosen = torch.zeros(num_heads, dtype=torch.bool, device=value.device)
        chosen[heads] = True
        columns = chosen.repeat_interleave(width // num_heads)  # (H * Dh,)
        source = torch.zeros((), dtype=value.dtype, device=value.device) if replacement is None else replacement
        return torch.where(columns, apply_patch("the replacement", value, source), value)

    return patch


# ----------------------------------------------------------------------------------------------
# Attention weights

GROUPS = ("img", "txt", "all", "concepts")


def attention_weights(
    model: nn.Module,
    *args,
    layers: Iterable[int] | None = None,
    queries: str = "img",
    keys: str = "txt",
    query_index: Sequence[int] | Tensor | None = None,
    chunk_size: int = 1024,
    **kwargs,
) -> dict[int, Tensor]:
    """Per-head attention weights {layer: (B, H, queries, keys)}, from the q and k sites (after QK-norm and
    RoPE), the softmax taken over the full key set as in the forward, then the chosen key columns kept.

    Groups: "img", "txt", "all" ([txt ; img], the joint order) and "concepts" (the concept stream: pass
    `concepts=model.concept_stream(...)`; concept queries attend to [concepts ; image] keys, or one of the two
    for attention="self"/"cross"). `query_index` picks query tokens within their group. Layers are numbered
    double blocks first, then single blocks (None: `config.map_layers`, the layers with one joint attention:
    all on Flux.1 and FLUX.2, the joint blocks on FLUX.3, whose mode layers attend within each mode). Rows are computed `chunk_size` queries at a time,
    so the full (T + L)^2 matrix exists only if asked for (queries="all", keys="all"). Arguments are those of
    `model.layers`, which stops after the last requested layer."""
    for name, group in (("queries", queries), ("keys", keys)):
        if group not in GROUPS:
            raise ValueError(f"{name} must be one of {GROUPS}, got {group!r}")
    stream = next((a for a in (*args, *kwargs.values()) if isinstance(a, ConceptStream)), None)
    if queries == "concepts":
        if stream is None:
            raise ValueError("queries='concepts' needs the concept stream: pass concepts=model.concept_stream(...)")
        sources = {"both": ("concepts", "img"), "cross": ("img",), "self": ("concepts",), "none": ()}[stream.attention]
        if keys != "all" and keys not in sources:
            raise ValueError(f"concept queries with attention={stream.attention!r} attend to {list(sources)}, not "
                             f"{keys!r}")  # fmt: skip
    elif keys == "concepts":
        raise ValueError("no image or text token attends to the concepts: keys='concepts' needs queries='concepts'")
    num_layers = model.config.num_layers
    chosen = list(model.config.map_layers) if layers is None else sorted(set(int(i) for i in layers))
    if not chosen or not all(0 <= i < num_layers for i in chosen):
        raise ValueError(f"layers must be a non-empty subset of 0..{num_layers - 1} (double blocks, then single "
                         f"blocks), got {list(layers) if layers is not None else None}")  # fmt: skip
    reader = AttentionReader(set(chosen), queries, keys, query_index, chunk_size, stream)
    weights = {}
    for layer in model.layers(*args, sites=reader, **kwargs):
        if layer.index in reader.wanted:
            weights[layer.index] = reader.layer_weights(layer.index)
        reader.held.clear()
        reader.next_layer = layer.index + 1
        if layer.index >= chosen[-1]:
            break
    return weights


class AttentionReader(NamedSites):
    """Holds the q and k sites of a wanted layer while it runs; `layer_weights` turns them into weights when
    the model yields that layer (layers are matched by the model's own numbering, whatever its blocks' names)."""

    def __init__(self, wanted: set[int], queries: str, keys: str, query_index, chunk_size: int, stream):
        self.wanted, self.next_layer = wanted, 0
        self.queries, self.keys, self.chunk_size = queries, keys, chunk_size
        self.query_index = None if query_index is None else torch.as_tensor(query_index, dtype=torch.long)
        self.attention = stream.attention if stream is not None else None
        self.num_txt: int | None = None
        self.held: dict[str, tuple[str, Tensor]] = {}  # site -> (block, value), for the current layer

    def visit(self, name: str, value: Tensor) -> Tensor:
        if name == "txt_in":
            self.num_txt = value.shape[1]
        block, _, site = name.rpartition(".")
        if self.next_layer in self.wanted and site in ("q", "k", "concept_q", "concept_k"):
            if site in self.held:
                raise ValueError(f"{self.held[site][0]} and {block} both attend within one layer: attention_weights "
                                 "reads layers with one joint attention (FLUX.3: its joint layers, "
                                 "config.map_layers)")  # fmt: skip
            self.held[site] = block, value
        return value

    def layer_weights(self, index: int) -> Tensor:
        held = {site: value for site, (_, value) in self.held.items()}
        if self.queries != "concepts":
            return self.joint(held["q"], held["k"])
        if "concept_q" not in held:
            raise ValueError(f"layer {index} gave no concept attention: the concept stream runs through single "
                             "blocks only with concepts_in_single_blocks=True")  # fmt: skip
        return self.concept(held["concept_q"], held["concept_k"], held["k"][:, :, self.num_txt :])

    def span(self, group: str, length: int) -> slice:
        return {"txt": slice(0, self.num_txt), "img": slice(self.num_txt, length), "all": slice(0, length)}[group]

    def joint(self, q: Tensor, k: Tensor) -> Tensor:
        """Rows of softmax(q k^T / sqrt(Dh)) over all T + L keys: (B, H, chosen queries, chosen keys)."""
        q = q[:, :, self.span(self.queries, q.shape[2])]
        return self.rows(q, k, self.span(self.keys, k.shape[2]))

    def concept(self, q_c: Tensor, k_c: Tensor, k_img: Tensor) -> Tensor:
        """Concept rows over the keys the concept queries attend to ([concepts ; image] for "both")."""
        parts = {"both": (k_c, k_img), "cross": (k_img,), "self": (k_c,)}[self.attention]
        keys = torch.cat(parts, dim=2)
        r = k_c.shape[2] if self.attention == "both" else 0
        columns = {"concepts": slice(0, k_c.shape[2]), "img": slice(r, keys.shape[2]), "all": slice(None)}[self.keys]
        return self.rows(q_c, keys, columns)

    def rows(self, q: Tensor, k: Tensor, columns: slice) -> Tensor:
        if self.query_index is not None:
            index = self.query_index
            if len(index) and not -q.shape[2] <= int(index.min()) <= int(index.max()) < q.shape[2]:
                raise ValueError(f"query_index {self.query_index.tolist()} is out of range for the {q.shape[2]} "
                                 f"{self.queries!r} queries")  # fmt: skip
            q = q[:, :, self.query_index.to(q.device)]
        precision = upcast(q.dtype)
        q, k = q.to(precision), k.to(precision)
        scale = q.shape[-1] ** -0.5
        chunks = [
            (chunk @ k.transpose(-1, -2) * scale).softmax(dim=-1)[..., columns]
            for chunk in q.split(self.chunk_size, dim=2)
        ]
        return torch.cat(chunks, dim=2)
