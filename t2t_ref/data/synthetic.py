"""A built-in image dataset drawn with NumPy: ten classes of shapes, told apart only by shape.

So that training runs with no data at all (`python -m t2t_ref.train` without a folder), and so
that a model that learns is visibly learning *shape*: every image is one shape in two random
colours, and nothing but the outline says which class it is:

    class           what varies per image
    disc            position, size
    ring            position, size
    square          position, size, any rotation
    hollow_square   position, size, any rotation
    triangle        position, size, any rotation
    plus            position, size, rotation within +-10 degrees (x is a plus turned 45 degrees)
    x               position, size, rotation within +-10 degrees
    hbars           position, size, rotation within +-10 degrees (three horizontal bars)
    vbars           position, size, rotation within +-10 degrees (three vertical bars)
    star            position, size, any rotation (five points)

Foreground and background colours are drawn independently of the class: uniform RGB, a pair
redrawn until the two are at least MIN_CONTRAST apart, and the lighter of the two (by luma) is
the shape's. So colour says nothing about the class, while "the shape is the light part" holds
in every image. With a random sign of the contrast a model must first discover sign-invariant
edge features, and a small ViT sat at chance for ~200 steps; with a random sign, smaller
shapes and +-15 degree tilts, the default run reached 65% validation accuracy, with the
settings here 96-97% (README). Every pixel and channel gets uniform noise (cheaper to draw
than Gaussian noise, and it looks the same).

How a shape is drawn: each shape is a signed distance function sdf(u, v) in the shape's own
frame (u, v in units of its radius r; negative inside, roughly the distance to the outline).
Every pixel centre (x, y) is moved into that frame (shift by the centre, rotate by -theta,
divide by r); the pixel's foreground coverage is clip(0.5 - r * sdf, 0, 1), which is 1 inside,
0 outside and a one-pixel ramp across the outline (cheap anti-aliasing). All images of a class
are drawn at once as (n, S, S) arrays: 10,000 images of 32x32 take well under a second.

Train and validation sets: make_shapes_splits(num_train, num_val, size, seed) draws them from
two independent streams derived from one seed. Calling make_shapes twice with different seeds
works as well; the images are continuous random draws, so the two sets never share an image.

Shapes: N images, S the side in pixels, n the images of one class being drawn.
"""

import math

import numpy as np

SHAPE_CLASSES = ("disc", "ring", "square", "hollow_square", "triangle",
                 "plus", "x", "hbars", "vbars", "star")
_LUMA = np.array([0.299, 0.587, 0.114])  # perceived lightness of an RGB colour
MIN_CONTRAST = 100.0   # least Euclidean RGB distance between foreground and background, of 441
NOISE_STD = (2.0, 12.0)  # per-image pixel noise std, uniform in this range (0..255 scale)
RADIUS = (0.28, 0.45)    # shape radius as a fraction of the image side, uniform in this range
# RandomResizedCrop scale for training on these images with crops (the default run uses none).
# With the photo default (0.08, 1) 9% of crops keep less than a fifth of the shape (labels turn
# to noise) and only 73% keep at least half of it; with (0.35, 1): 0.2% and 96% (measured on
# 2,000 32x32 images).
SYNTHETIC_CROP_SCALE = (0.35, 1.0)

_SMALL_TILT = math.pi / 18  # +-10 degrees: a plus and an x stay >= 25 degrees apart
_MAX_ROTATION = {  # rotation drawn uniformly in [-a, a); a full symmetry period for the others
    "disc": 0.0, "ring": 0.0, "square": math.pi / 4, "hollow_square": math.pi / 4,
    "triangle": math.pi / 3, "plus": _SMALL_TILT, "x": _SMALL_TILT, "hbars": _SMALL_TILT,
    "vbars": _SMALL_TILT, "star": math.pi / 5,
}


def make_shapes(num_images, size, seed, num_classes=10):
    """Draw a balanced set of shape images.

    num_images  : N, the number of images; class counts differ by at most one
    size        : S, the side of the square images in pixels (32 or 64 work well; >= 16)
    seed        : an int (or a numpy SeedSequence); the same arguments give the same images
    num_classes : use the first num_classes of SHAPE_CLASSES (2 to 10)

    Returns (images uint8 (N, S, S, 3), labels int64 (N,), class_names list[str]), in random
    class order (labels shuffled).
    """
    if not 2 <= num_classes <= len(SHAPE_CLASSES):
        raise ValueError(f"num_classes={num_classes}: the synthetic set has 2 to "
                         f"{len(SHAPE_CLASSES)} classes")
    if size < 16:
        raise ValueError(f"size={size} is too small to tell shapes apart: use 16 or more")
    rng = np.random.default_rng(seed)
    class_names = list(SHAPE_CLASSES[:num_classes])
    labels = np.arange(num_images, dtype=np.int64) % num_classes  # balanced
    rng.shuffle(labels)
    images = np.empty((num_images, size, size, 3), dtype=np.uint8)
    for label, name in enumerate(class_names):
        where = np.flatnonzero(labels == label)
        for start in range(0, len(where), 256):  # small chunks stay in cache
            chunk = where[start:start + 256]
            images[chunk] = _draw(name, len(chunk), size, rng)
    return images, labels, class_names


def make_shapes_splits(num_train, num_val, size, seed, num_classes=10):
    """Independent train and validation sets from one seed.

    Returns ((train_images, train_labels), (val_images, val_labels), class_names), each set as
    make_shapes returns it; the two are drawn from SeedSequence(seed).spawn(2).
    """
    train_seed, val_seed = np.random.SeedSequence(seed).spawn(2)
    train_images, train_labels, names = make_shapes(num_train, size, train_seed, num_classes)
    val_images, val_labels, _ = make_shapes(num_val, size, val_seed, num_classes)
    return (train_images, train_labels), (val_images, val_labels), names


def _draw(name, n, size, rng):
    """n images of one shape: (n, S, S, 3) uint8."""
    # per-image parameters
    radius = rng.uniform(*RADIUS, n) * size                     # (n,) pixels
    margin = 0.9 * radius                                       # keep the shape mostly inside
    cx = rng.uniform(margin, size - margin)                     # (n,)
    cy = rng.uniform(margin, size - margin)                     # (n,)
    max_rotation = _MAX_ROTATION[name]
    theta = rng.uniform(-max_rotation, max_rotation, n)         # (n,)
    fg, bg = _colour_pairs(n, rng)                              # (n, 3) each
    noise_std = rng.uniform(*NOISE_STD, n)                      # (n,)

    # every pixel centre in each shape's own frame, in units of its radius
    pix = np.arange(size, dtype=np.float32) + 0.5               # (S,)
    dx = pix[None, None, :] - cx[:, None, None].astype(np.float32)  # (n, 1, S)
    dy = pix[None, :, None] - cy[:, None, None].astype(np.float32)  # (n, S, 1)
    cos = np.cos(theta).astype(np.float32)[:, None, None]       # (n, 1, 1)
    sin = np.sin(theta).astype(np.float32)[:, None, None]
    inv_r = (1.0 / radius).astype(np.float32)[:, None, None]
    u = (cos * dx + sin * dy) * inv_r                           # (n, S, S)
    v = (cos * dy - sin * dx) * inv_r                           # (n, S, S)

    sdf = _SDF[name](u, v)                                      # (n, S, S), radius units
    coverage = np.clip(0.5 - sdf / inv_r, 0.0, 1.0)             # (n, S, S), 1 inside

    # blend per channel, channel-first (a last axis of 3 makes NumPy's inner loops crawl)
    out = np.empty((n, size, size, 3), dtype=np.uint8)
    width = (np.sqrt(12.0) * noise_std).astype(np.float32)     # uniform noise with that std
    for c in range(3):
        ch = rng.random((n, size, size), dtype=np.float32)     # (n, S, S) in [0, 1)
        ch -= 0.5
        ch *= width[:, None, None]
        ch += coverage * (fg[:, c] - bg[:, c]).astype(np.float32)[:, None, None]
        ch += (bg[:, c] + 0.5).astype(np.float32)[:, None, None]   # + 0.5: round, not floor
        np.clip(ch, 0.0, 255.5, out=ch)
        out[..., c] = ch                                        # float -> uint8 truncates
    return out


def _colour_pairs(n, rng):
    """(fg, bg), each (n, 3) float64 in [0, 255], at least MIN_CONTRAST apart, fg the lighter.

    Pairs that are too close are redrawn whole, then each pair is ordered by luma (ITU-R 601
    weights), so the two colours of a pair come from one distribution whatever the class.
    """
    fg, bg = rng.uniform(0, 255, (n, 3)), rng.uniform(0, 255, (n, 3))
    while True:
        close = np.flatnonzero(np.linalg.norm(fg - bg, axis=1) < MIN_CONTRAST)
        if close.size == 0:
            break
        fg[close] = rng.uniform(0, 255, (close.size, 3))
        bg[close] = rng.uniform(0, 255, (close.size, 3))
    darker = fg @ _LUMA < bg @ _LUMA  # (n,)
    fg[darker], bg[darker] = bg[darker], fg[darker]  # fancy indexing copies: a real swap
    return fg, bg


# ---- the shapes: signed distance in radius units, negative inside; u right, v down ----------

def _box(u, v, half_u, half_v):
    """Axis-aligned rectangle |u| <= half_u, |v| <= half_v (exact across its edges)."""
    return np.maximum(np.abs(u) - half_u, np.abs(v) - half_v)


def _disc(u, v):
    return np.sqrt(u * u + v * v) - 0.9


def _ring(u, v):
    return np.abs(np.sqrt(u * u + v * v) - 0.7) - 0.22          # radii 0.48 to 0.92


def _square(u, v):
    return _box(u, v, 0.68, 0.68)


def _hollow_square(u, v):
    return np.abs(np.maximum(np.abs(u), np.abs(v)) - 0.55) - 0.17  # sides 0.38 to 0.72


def _triangle(u, v):
    """Equilateral, circumradius 0.96: inside all three edges (apex up)."""
    edges = [math.cos(a) * u + math.sin(a) * v for a in (math.pi / 2, math.pi * 7 / 6,
                                                           math.pi * 11 / 6)]
    return np.maximum(np.maximum(edges[0], edges[1]), edges[2]) - 0.48


def _plus(u, v):
    return np.minimum(_box(u, v, 0.92, 0.22), _box(u, v, 0.22, 0.92))


def _x(u, v):
    c = math.sqrt(0.5)
    return _plus(c * (u + v), c * (v - u))                      # the plus turned by 45 degrees


def _hbars(u, v):
    """Three horizontal bars at v = -0.6, 0, 0.6, each 0.32 thick, 1.7 long."""
    nearest = np.minimum(np.minimum(np.abs(v + 0.6), np.abs(v)), np.abs(v - 0.6))
    return np.maximum(nearest - 0.16, np.abs(u) - 0.85)


def _vbars(u, v):
    return _hbars(v, u)


def _star(u, v):
    """Five points at radius 1, inner corners at radius 0.42.

    Fold the angle into one half-point wedge [0, pi/5]; there the star is the triangle
    (origin, tip A at angle 0, inner corner B at angle pi/5), i.e. the origin's side of line AB.
    """
    rho = np.sqrt(u * u + v * v)
    wedge = math.pi / 5
    phi = np.abs(np.mod(np.arctan2(v, u) + math.pi / 2, 2 * wedge) - wedge)
    px, py = rho * np.cos(phi), rho * np.sin(phi)              # folded point, tip on the +x axis
    ax, ay = 1.0, 0.0
    bx, by = 0.42 * math.cos(wedge), 0.42 * math.sin(wedge)
    nx, ny = by - ay, ax - bx                                   # normal of AB, away from origin
    norm = math.hypot(nx, ny)
    return ((px - ax) * nx + (py - ay) * ny) / norm


_SDF = {"disc": _disc, "ring": _ring, "square": _square, "hollow_square": _hollow_square,
        "triangle": _triangle, "plus": _plus, "x": _x, "hbars": _hbars, "vbars": _vbars,
        "star": _star}
