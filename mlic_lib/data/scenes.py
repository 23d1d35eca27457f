"""Embedded multi-label "scenes": coloured real MNIST digits on a canvas, with planted structure.

The phenomena the five papers study need label structure that MNIST alone lacks, so we plant it
and know the ground truth:

* **classes** = digit x colour (10 digits x 2 colours = 20 classes by default, e.g. ``"red 3"``);
* **super-categories** (``groups``): classes are assigned at random to groups; a scene picks one
  group and draws most of its objects from it, so classes of a group co-occur (like COCO's
  "kitchen" or "vehicle" classes). The assignment is random, so only co-occurrence, not appearance,
  relates the classes of a group;
* **biased pairs** ``(b, c)``: in training, class ``b`` is accompanied by its context ``c`` with
  probability ``p_bias`` (Singh et al. 2020, used by SpliceMix Sec. IV-G). Test sets can be drawn in
  ``"exclusive"`` mode (every image has some ``b`` without its ``c``) or ``"cooccur"`` mode (``b``
  with ``c``);
* an optional **long tail**: class sampling weights follow a power law ``(rank + 1) ** -exponent``
  over a random class ranking (Pareto/Zipf-type), for LTML-style head/medium/tail studies;
* objects at **varying scale**, with the tight ground-truth **box** of every object, so class
  activation maps can be scored (fraction of CAM mass inside the box).

The *world* (groups, pairs, class ranking) is fixed by :attr:`SceneSpec.world_seed`; each draw of
images has its own ``seed``, and train/test draws use disjoint digit images.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields

import numpy as np
import torch
import torch.nn.functional as F

from mlic_lib.data.digits import digit_pool

COLOURS: dict[str, tuple[float, float, float]] = {
    "red": (1.0, 0.25, 0.2),
    "green": (0.25, 0.95, 0.3),
    "blue": (0.3, 0.5, 1.0),
    "yellow": (1.0, 0.9, 0.2),
    "magenta": (1.0, 0.3, 1.0),
    "cyan": (0.2, 0.95, 0.95),
}
MODES = ("natural", "exclusive", "cooccur")


@dataclass(frozen=True)
class SceneSpec:
    """Everything that defines the scene *world* (not a particular draw of images)."""

    n_digits: int = 10
    colours: tuple[str, ...] = ("red", "green")
    n_groups: int = 5
    p_in_group: float = 0.85
    min_objects: int = 1
    max_objects: int = 4
    canvas: int = 64
    scale_range: tuple[float, float] = (0.65, 1.35)
    n_biased_pairs: int = 3
    p_bias: float = 0.95
    long_tail_exponent: float = 0.0
    background_noise: float = 0.0
    world_seed: int = 0

    def __post_init__(self) -> None:
        for f in fields(self):  # whole numbers for the int fields (2.0 is 2), finite floats for the float ones: the
            v = getattr(self, f.name)  # same scenes then have one cache key, and a bad kind fails here, by name
            if f.type in ("int", "float"):
                if isinstance(v, bool) or not isinstance(v, (int, float, np.number)) or (
                        not isinstance(v, (int, np.integer)) and not np.isfinite(v)) or (
                        f.type == "int" and v != int(v)):
                    raise ValueError(f"{f.name} must be a {'whole' if f.type == 'int' else 'finite'} number, got {v!r}")
                object.__setattr__(self, f.name, int(v) if f.type == "int" else float(v))
        object.__setattr__(self, "colours", tuple(self.colours))
        object.__setattr__(self, "scale_range", tuple(float(x) for x in self.scale_range))
        if self.world_seed < 0:
            raise ValueError(f"world_seed must be >= 0 (a NumPy seed), got {self.world_seed}")
        unknown = [c for c in self.colours if c not in COLOURS]
        if unknown:
            raise ValueError(f"unknown colour(s) {unknown}; choose from {sorted(COLOURS)}")
        if not self.colours or len(set(self.colours)) != len(self.colours):  # a repeat: classes that look alike
            raise ValueError(f"colours must name one colour or more, each once; got {self.colours}")
        if not 1 <= self.n_digits <= 10:
            raise ValueError(f"n_digits must be 1..10, got {self.n_digits}")
        if not 1 <= self.n_groups <= self.num_classes:
            raise ValueError(f"n_groups must be 1..{self.num_classes}, got {self.n_groups}")
        if not 1 <= self.min_objects <= self.max_objects <= self.num_classes:
            raise ValueError("need 1 <= min_objects <= max_objects <= number of classes")
        lo, hi = self.scale_range
        if not 0 < lo <= hi or round(28 * hi) > self.canvas:
            raise ValueError(f"scale_range {self.scale_range} must be positive and fit the {self.canvas}px canvas")
        if not 0 <= 2 * self.n_biased_pairs <= self.num_classes:
            raise ValueError(f"n_biased_pairs must be 0..{self.num_classes // 2}, got {self.n_biased_pairs}")
        if self.n_biased_pairs and self.n_groups == 1:
            raise ValueError("biased pairs join classes of different super-categories: n_biased_pairs > 0 needs "
                             "n_groups >= 2")
        if round(28 * lo) < 1:
            raise ValueError(f"scale_range {self.scale_range} draws digits under 1 pixel (28 px x scale)")
        for name in ("p_in_group", "p_bias"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name} must be a probability, got {getattr(self, name)}")

    @property
    def num_classes(self) -> int:
        return self.n_digits * len(self.colours)

    @classmethod
    def from_dict(cls, d: dict) -> SceneSpec:
        """Build from a profile dict; unknown keys are an error naming the valid ones."""
        valid = {f.name for f in fields(cls)}
        bad = sorted(set(d) - valid)
        if bad:
            raise ValueError(f"unknown scene option(s) {bad}; valid options: {sorted(valid)}")
        d = dict(d)
        for key in ("colours", "scale_range"):
            if key in d:
                d[key] = tuple(d[key])
        return cls(**d)

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class SceneWorld:
    """The planted ground truth derived from a :class:`SceneSpec`."""

    spec: SceneSpec
    class_names: tuple[str, ...]
    class_digit: np.ndarray  # (C,) digit of each class
    class_colour: np.ndarray  # (C,) colour index of each class
    groups: np.ndarray  # (C,) super-category of each class
    biased_pairs: tuple[tuple[int, int], ...]  # (biased b, context c), different groups
    class_weights: np.ndarray  # (C,) sampling weight (uniform unless long-tailed)

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def group_members(self, g: int) -> np.ndarray:
        return np.flatnonzero(self.groups == g)


def make_world(spec: SceneSpec) -> SceneWorld:
    """Derive the classes, super-categories, biased pairs and class weights of ``spec``."""
    rng = np.random.default_rng(spec.world_seed)
    C = spec.num_classes
    class_colour, class_digit = np.divmod(np.arange(C), spec.n_digits)
    names = tuple(f"{spec.colours[k]} {d}" for k, d in zip(class_colour, class_digit, strict=True))
    groups = rng.permutation(np.arange(C) % spec.n_groups)
    ranking = rng.permutation(C)
    weights = (ranking + 1.0) ** -spec.long_tail_exponent
    weights = weights / weights.sum()
    # biased pairs: b and c in different super-categories, every class in at most one pair
    for _ in range(100):  # the greedy pairing can get stuck; the first try is kept whenever it succeeds
        pairs: list[tuple[int, int]] = []
        used: set[int] = set()
        for b in rng.permutation(C):
            if len(pairs) == spec.n_biased_pairs:
                break
            if b in used:
                continue
            options = [c for c in rng.permutation(C) if c not in used and c != b and groups[c] != groups[b]]
            if options:
                pairs.append((int(b), int(options[0])))
                used.update((int(b), int(options[0])))
        if len(pairs) == spec.n_biased_pairs:
            break
    else:
        raise ValueError(f"could not plant {spec.n_biased_pairs} biased pairs across the super-categories of "
                         f"world_seed={spec.world_seed}; lower n_biased_pairs or raise n_groups")
    return SceneWorld(spec, names, class_digit, class_colour, groups, tuple(pairs), weights)


@dataclass
class SceneSet:
    """A draw of scenes: ``images uint8 (n, 3, H, W)``, ``targets float32 (n, C)``, and ``boxes``:
    one ``int64 (k, 5)`` array per image with rows ``(class, x0, y0, x1, y1)`` (half-open pixels)."""

    images: np.ndarray
    targets: np.ndarray
    boxes: list[np.ndarray]
    world: SceneWorld
    mode: str = "natural"
    meta: dict = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.images)

    @property
    def class_names(self) -> tuple[str, ...]:
        return self.world.class_names


def _digit_by_class(split: str) -> list[np.ndarray]:
    images, labels = digit_pool(split)
    return [images[labels == d] for d in range(10)]


def _sample_classes(world: SceneWorld, rng: np.random.Generator, mode: str) -> list[int]:
    spec = world.spec
    C = world.num_classes
    k = int(rng.integers(spec.min_objects, spec.max_objects + 1))
    chosen: list[int] = []
    forbidden: set[int] = set()
    if mode != "natural":
        b, c = world.biased_pairs[int(rng.integers(len(world.biased_pairs)))]
        chosen.append(b)
        if mode == "cooccur":
            chosen.append(c)
        else:
            forbidden.add(c)
    group_w = np.bincount(world.groups, weights=world.class_weights, minlength=spec.n_groups)
    g = int(rng.choice(spec.n_groups, p=group_w / group_w.sum()))
    in_group = world.groups == g
    while len(chosen) < k:
        pool = in_group if rng.random() < spec.p_in_group else np.ones(C, dtype=bool)
        w = np.where(pool, world.class_weights, 0.0)
        w[chosen] = 0.0
        w[list(forbidden)] = 0.0
        if w.sum() <= 0:  # group exhausted: draw from all classes
            w = world.class_weights.copy()
            w[chosen] = 0.0
            w[list(forbidden)] = 0.0
            if w.sum() <= 0:
                break
        chosen.append(int(rng.choice(C, p=w / w.sum())))
    if mode == "natural":
        for b, c in world.biased_pairs:  # plant the bias: b brings its context c
            if b in chosen and c not in chosen and rng.random() < spec.p_bias:
                chosen.append(c)
    return chosen


def _place(size: int, canvas: int, placed: list[tuple[int, int, int, int]], rng) -> tuple[int, int]:
    """Random top-left corner, avoiding heavy overlap (IoU < 0.15) with already placed objects."""
    best, best_iou = (0, 0), 2.0
    for _ in range(25):
        x, y = (int(v) for v in rng.integers(0, canvas - size + 1, size=2))
        iou = 0.0
        for x0, y0, x1, y1 in placed:
            iw = max(0, min(x + size, x1) - max(x, x0))
            ih = max(0, min(y + size, y1) - max(y, y0))
            inter = iw * ih
            iou = max(iou, inter / (size * size + (x1 - x0) * (y1 - y0) - inter))
        if iou < 0.15:
            return x, y
        if iou < best_iou:
            best, best_iou = (x, y), iou
    return best


def make_scenes(
    n_images: int,
    spec: SceneSpec | None = None,
    seed: int = 0,
    split: str = "train",
    mode: str = "natural",
) -> SceneSet:
    """Draw ``n_images`` scenes of the world defined by ``spec``.

    Parameters
    ----------
    n_images : number of canvases.
    spec : the world; default :class:`SceneSpec()` (20 classes, 5 super-categories, 3 biased pairs).
    seed : seed of this draw (independent of ``spec.world_seed``).
    split : 'train' or 'test' half of the embedded digit pool (disjoint digit images).
    mode : 'natural' (the training distribution, with planted bias), 'exclusive' (each image holds
        a biased class ``b`` without its context ``c``) or 'cooccur' (``b`` together with ``c``).
    """
    spec = spec or SceneSpec()
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if mode != "natural" and spec.n_biased_pairs == 0:
        raise ValueError(f"mode={mode!r} needs biased pairs; set n_biased_pairs > 0 in the SceneSpec")
    if n_images < 1:
        raise ValueError(f"n_images must be positive, got {n_images}")
    world = make_world(spec)
    rng = np.random.default_rng(seed)
    digits = _digit_by_class(split)
    colours = np.array([COLOURS[c] for c in spec.colours], dtype=np.float32)
    H = spec.canvas
    images = np.zeros((n_images, 3, H, H), dtype=np.float32)
    targets = np.zeros((n_images, world.num_classes), dtype=np.float32)
    boxes: list[np.ndarray] = []
    for i in range(n_images):
        chosen = _sample_classes(world, rng, mode)
        placed: list[tuple[int, int, int, int]] = []
        rows = []
        for cls in chosen:
            pool = digits[world.class_digit[cls]]
            digit = torch.from_numpy(pool[int(rng.integers(len(pool)))].astype(np.float32) / 255.0)
            size = int(round(28 * rng.uniform(*spec.scale_range)))
            glyph = F.interpolate(digit[None, None], size=(size, size), mode="bilinear", align_corners=False)
            glyph = glyph[0, 0].clamp_(0, 1).numpy()
            x, y = _place(size, H, placed, rng)
            placed.append((x, y, x + size, y + size))
            region = images[i, :, y : y + size, x : x + size]
            np.maximum(region, glyph[None] * colours[world.class_colour[cls], :, None, None], out=region)
            ys, xs = np.nonzero(glyph > 0.2)
            if len(xs):
                rows.append((cls, x + xs.min(), y + ys.min(), x + xs.max() + 1, y + ys.max() + 1))
            else:
                rows.append((cls, x, y, x + size, y + size))
            targets[i, cls] = 1.0
        boxes.append(np.asarray(rows, dtype=np.int64).reshape(-1, 5))
    if spec.background_noise > 0:
        images += rng.normal(0.0, spec.background_noise, size=images.shape).astype(np.float32)
    images_u8 = (np.clip(images, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)
    return SceneSet(images_u8, targets, boxes, world, mode, {"seed": seed, "split": split})
