"""Quick probes of a demo-model export (issue 14: does a CPU-sized Flux learn shapes?), faster than the
benchmark and per layer. All on image stream 2 (training uses 0), empty prompt, encode mode at t = 0.5 (--t; the
shapes presets use 0.1), 2 noise samples, maps upsampled bilinearly, as the shapes-binding preset.

    PYTHONPATH=. python scripts/probe_demo.py binding WORK/exports/step-010000 --images 60 --t 0.1
    PYTHONPATH=. python scripts/probe_demo.py recognition WORK/exports/step-010000
    PYTHONPATH=. python scripts/probe_demo.py decodable WORK/exports/step-010000 --images 120
    PYTHONPATH=. python scripts/probe_demo.py grounding WORK/exports/step-010000 --images 20
    PYTHONPATH=. python scripts/probe_demo.py drawing WORK/exports/step-010000

binding:      two-object images with two different shape words (then: two different colour words), offered
              [background, word 1, word 2]: % of object pixels on their own word, per layer, for the mean
              of the double blocks and for the mean of the last two (the shapes presets' maps).
recognition:  single-object images offered [background, circle, square, triangle], empty prompt and the image's
              own caption: % of object pixels on the right shape word (chance among the shapes: 33%), and which
              word wins each shape's pixels.
decodable:    is the shape of a token's object in the image stream at all? A linear probe (logistic regression)
              per site, on tokens that lie inside one object, trained on the first 70% of the images and
              scored on the rest, with the empty prompt and with the image's own caption; "two shapes" scores
              only the images whose two objects have different shapes (where the caption must be bound).
grounding:    two-object images with two different shapes, offered [background, shape 1, shape 2]: the share of
              each concept's attention over the image tokens (softmax over them, mean of the heads, one noise
              sample) that lies on its own region (the background word: the background; a shape word: its
              object, and on the other object), per double block: does a concept find its object at all?
drawing:      48 single-object captions (3 shapes x 4 colours x 4 backgrounds, seed 0): how often the drawn
              object has the shape asked for, judged by how much of its bounding box it fills (a square
              1, a circle pi/4, a triangle 1/2; exact on the dataset's own images).
"""

from __future__ import annotations

import argparse

import numpy as np
import torch
import torch.nn.functional as F
from einops import rearrange

from concept_attention.shapes import BACKGROUND_COLOURS, COLOURS, SHAPES, ShapesConfig, make_sample
from flux_mini.interp import Interventions

STREAM = 2


def upsampled_argmax(maps: torch.Tensor, size: tuple[int, int]) -> np.ndarray:
    """(r, h, w) maps -> (H, W) index of the winning concept after bilinear upsampling."""
    return F.interpolate(maps[None].float(), size=size, mode="bilinear")[0].argmax(0).numpy()


def binding(pipe, images: int, attention: str = "both", t: float = 0.5) -> None:
    depth = pipe.flux.model.config.depth
    for kind in ("shape", "colour"):
        hits: dict[str, int] = {}
        total, index, done = 0, 0, 0
        while done < images:
            sample = make_sample(STREAM, index, ShapesConfig())
            index += 1
            words = sample.class_names[1:] if kind == "shape" else sample.colours
            if len(words) != 2 or words[0] == words[1]:
                continue
            done += 1
            every = range(depth + pipe.flux.model.config.depth_single_blocks)
            out = pipe.encode_image(sample.image, [sample.class_names[0], *words], prompt="", t=t, num_samples=2,
                                    attention=attention,
                                    per_layer=True, layer_indices=every)
            layers = out.layer_maps["output"]  # (layers, r, h, w): the double blocks, then the single blocks
            variants = {f"layer {i}": layers[i] for i in every} | {"double blocks": layers[:depth].mean(0),
                                                                    "last two double blocks": layers[depth - 2:depth].mean(0)}
            objects = sample.mask > 0
            total += int(objects.sum())
            for name, maps in variants.items():
                predicted = upsampled_argmax(maps, sample.mask.shape)
                hits[name] = hits.get(name, 0) + int((predicted[objects] == sample.mask[objects]).sum())
        print(f"{kind} words, binding accuracy on {images} images: "
              + ", ".join(f"{name} {100 * hit / total:.0f}%" for name, hit in hits.items()))


def recognition(pipe, images: int, attention: str = "both", t: float = 0.5) -> None:
    words = ["background", *SHAPES]
    for protocol in ("empty prompt", "caption"):
        counts = np.zeros((len(SHAPES), len(words)), dtype=np.int64)  # true shape x word that won the pixel
        for index in range(images):
            sample = make_sample(STREAM, index, ShapesConfig(two_object_prob=0.0))
            out = pipe.encode_image(sample.image, [sample.class_names[0], *SHAPES], t=t, num_samples=2,
                                    attention=attention,
                                    prompt="" if protocol == "empty prompt" else sample.caption)
            predicted = upsampled_argmax(out.concept_maps, sample.mask.shape)
            won = np.bincount(predicted[sample.mask == 1], minlength=len(words))
            counts[SHAPES.index(sample.class_names[1])] += won
        right = sum(counts[i, 1 + i] for i in range(len(SHAPES))) / counts.sum()
        print(f"single-object recognition on {images} images, {protocol}: {100 * right:.0f}% of object pixels on "
              "the right shape word (chance among the shapes 33%); % of each shape's pixels won by "
              + "/".join(words) + ":")
        for shape, row in zip(SHAPES, counts):
            shares = " ".join(f"{100 * n / row.sum():3.0f}" for n in row) if row.sum() else "(no such image)"
            print(f"  {shape:9s} {shares}")


def object_tokens(mask: np.ndarray, grid: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """(which tokens lie wholly inside one object: (L,) bool, that object's index 1..k: (L,))."""
    pixels = rearrange(torch.from_numpy(mask.astype(np.int64)), "(h p) (w q) -> (h w) (p q)", h=grid[0], w=grid[1])
    inside = (pixels == pixels[:, :1]).all(1) & (pixels[:, 0] > 0)
    return inside, pixels[:, 0]


def linear_probe_accuracy(train_x: torch.Tensor, train_y: torch.Tensor, test_x: torch.Tensor, test_y: torch.Tensor,
                          weight_decay: float = 1e-2) -> torch.Tensor:
    """Multinomial logistic regression on standardised features (L-BFGS, L2): per-test-token hit (bool)."""
    mean, std = train_x.mean(0), train_x.std(0) + 1e-6
    train_x, test_x = (train_x - mean) / std, (test_x - mean) / std
    classes = int(max(train_y.max(), test_y.max())) + 1
    weight = torch.zeros(train_x.shape[1], classes, dtype=torch.float64, requires_grad=True)
    bias = torch.zeros(classes, dtype=torch.float64, requires_grad=True)
    optimizer = torch.optim.LBFGS([weight, bias], max_iter=500, line_search_fn="strong_wolfe")

    def loss():
        optimizer.zero_grad()
        value = F.cross_entropy(train_x @ weight + bias, train_y) + weight_decay * weight.square().sum()
        value.backward()
        return value

    optimizer.step(loss)
    return (test_x @ weight + bias).argmax(1) == test_y


def decodable(pipe, images: int, t: float = 0.5) -> None:
    model = pipe.flux.model
    blocks = range(model.config.depth)
    sites = ["img_in"] + [f"double_blocks.{i}.{site}" for i in blocks for site in ("img_attn", "img")]
    for protocol in ("empty prompt", "caption"):
        features, labels, image_of, two_shapes = {site: [] for site in sites}, [], [], []
        for index in range(images):
            sample = make_sample(STREAM, index, ShapesConfig())
            cache = Interventions(model, cache=sites)
            pipe.encode_image(sample.image, [sample.class_names[0], *SHAPES], t=t, num_samples=1, interventions=cache,
                              prompt="" if protocol == "empty prompt" else sample.caption)
            inside, owner = object_tokens(sample.mask, pipe.flux.token_grid(*sample.mask.shape))
            for site in sites:
                features[site].append(cache.cache[0][site][0][inside].double())
            labels += [SHAPES.index(sample.class_names[o]) for o in owner[inside].tolist()]
            image_of += [index] * int(inside.sum())
            two_shapes += [len(set(sample.class_names[1:])) == 2] * int(inside.sum())
        labels, image_of, two_shapes = torch.tensor(labels), torch.tensor(image_of), torch.tensor(two_shapes)
        train = image_of < int(0.7 * images)
        majority = (labels[~train] == labels[train].mode().values).double().mean()
        print(f"{protocol}: shape of the token's object, linear probe on {int((~train).sum())} test tokens "
              f"(most common shape {100 * majority:.0f}%)")
        for site in sites:
            x = torch.cat(features[site])
            hits = linear_probe_accuracy(x[train], labels[train], x[~train], labels[~train])
            two = hits[two_shapes[~train]].double()
            print(f"  {site:24s} {100 * hits.double().mean():.0f}%, two shapes "
                  + (f"{100 * two.mean():.0f}%" if len(two) else "(no test image has two shapes)"))


def grounding(pipe, images: int, t: float = 0.5) -> None:
    model = pipe.flux.model
    depth = model.config.depth
    sites = [f"double_blocks.{i}.{site}" for i in range(depth) for site in ("concept_q", "k")]
    shares = np.zeros((depth, 3))  # (layer, [background word, shape words, shape words on the other object])
    areas = np.zeros(2)
    done, index = 0, 0
    while done < images:
        sample = make_sample(STREAM, index, ShapesConfig())
        index += 1
        if len(sample.class_names) != 3 or sample.class_names[1] == sample.class_names[2]:
            continue
        done += 1
        cache = Interventions(model, cache=sites)
        pipe.encode_image(sample.image, sample.class_names, prompt="", t=t, num_samples=1, interventions=cache)
        grid = pipe.flux.token_grid(*sample.mask.shape)
        mask = torch.from_numpy(sample.mask)
        regions = torch.stack([F.adaptive_avg_pool2d((mask == i).double()[None], grid)[0].flatten() for i in range(3)])
        areas += [regions[0].mean().item(), regions[1:].mean().item()]
        for layer in range(depth):
            q = cache.cache[0][f"double_blocks.{layer}.concept_q"][0].double()  # (H, r, Dh)
            k = cache.cache[0][f"double_blocks.{layer}.k"][0, :, -regions.shape[1]:].double()  # (H, L, Dh)
            attention = torch.einsum("hrd,hld->hrl", q, k).div(q.shape[-1] ** 0.5).softmax(-1).mean(0)  # (r, L)
            share = (attention * regions).sum(-1)
            other = (attention[1:] * regions.flip(0)[:2]).sum(-1)  # word 1 on object 2, word 2 on object 1
            shares[layer] += [share[0].item(), share[1:].mean().item(), other.mean().item()]
    print(f"grounding on {images} two-shape images, empty prompt: share of each concept's image attention (softmax "
          f"over the image keys, mean of heads) on its own region; area share: background {100 * areas[0] / images:.0f}%, "
          f"an object {100 * areas[1] / images:.0f}%")
    for layer in range(depth):
        print(f"  layer {layer}: background word {100 * shares[layer, 0] / images:.0f}%, "
              f"shape words {100 * shares[layer, 1] / images:.0f}% (on the other object {100 * shares[layer, 2] / images:.0f}%)")


def drawn_shape(image, colour: str) -> str | None:
    """The shape of the pixels nearest `colour` (among all named and background colours), by bounding-box fill."""
    palette = {**COLOURS, **BACKGROUND_COLOURS}
    pixels = np.asarray(image, dtype=np.float64)
    reference = np.array(list(palette.values()), dtype=np.float64)
    nearest = np.linalg.norm(pixels[:, :, None] - reference[None, None], axis=-1).argmin(-1)
    ys, xs = np.nonzero(nearest == list(palette).index(colour))
    if len(ys) < 20:
        return None
    fill = len(ys) / ((ys.max() - ys.min() + 1) * (xs.max() - xs.min() + 1))
    return "square" if fill > 0.88 else "circle" if fill > 0.66 else "triangle"


def drawing(pipe) -> None:
    colours, places = ("red", "blue", "yellow", "purple"), ("on grass", "in the sky", "on sand", "at night")
    right = {}
    for shape in SHAPES:
        prompts = [f"a {colour} {shape} {place}" for colour in colours for place in places]
        images = pipe.flux(prompts, seed=0, progress=False)
        drawn = [drawn_shape(image, prompt.split()[1]) for prompt, image in zip(prompts, images)]
        right[shape] = sum(d == shape for d in drawn)
    print(f"drawn as asked: {sum(right.values())}/48 ("
          + ", ".join(f"{shape} {n}/16" for shape, n in right.items()) + ")")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("probe", choices=("binding", "recognition", "decodable", "grounding", "drawing"))
    parser.add_argument("model", help="a pipeline folder, e.g. weights/demo or WORK/exports/step-NNNNNN")
    parser.add_argument("--images", type=int, default=30)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--attention", default="both", choices=("both", "cross", "self", "none"),
                        help="binding, recognition: what the concept queries attend to (both: the method; cross: the "
                        "image only; self: the concepts only; none: o_c = v_c)")
    parser.add_argument("--t", type=float, default=0.5, help="noise level of encode mode (the shapes presets: 0.1)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    from concept_attention.pipeline import ConceptAttentionPipeline

    pipe = ConceptAttentionPipeline.from_folder(args.model)
    if args.probe == "binding":
        binding(pipe, args.images, args.attention, args.t)
    elif args.probe == "recognition":
        recognition(pipe, args.images, args.attention, args.t)
    elif args.probe == "decodable":
        decodable(pipe, args.images, args.t)
    elif args.probe == "grounding":
        grounding(pipe, args.images, args.t)
    else:
        drawing(pipe)


if __name__ == "__main__":
    main()
