"""Candidate specialized tasks (one-off trial code, not the library): iid drawn images, so val200 and test come from one distribution.

Each `CANDIDATES` entry is (draw(rng) -> (uint8 28 x 28 image, label), classes). `blood_j` became
`moppa_nb.mini_vtab.blood_cell_image` (same_as_library.py checks the images are byte-identical).
"""
import numpy as np
from PIL import Image, ImageDraw
from scipy import ndimage
S, SS = 28, 4

def _canvas(): return Image.new("L", (S * SS, S * SS), 0)
def _down(c): return np.asarray(c.resize((S, S), Image.Resampling.BOX)).astype(np.float64)
def _poly(cx, cy, r_of_t, angle, n=48):
    t = np.linspace(0, 2 * np.pi, n, endpoint=False)
    r = r_of_t(t)
    return [((cx + r[i] * np.cos(t[i] + angle)) * SS, (cy - r[i] * np.sin(t[i] + angle)) * SS) for i in range(n)]
def _finish(img, rng, blur=(0.3, 0.8), noise=(3, 8)):
    img = ndimage.gaussian_filter(img, rng.uniform(*blur))
    img = img + rng.normal(0, rng.uniform(*noise), img.shape)
    return np.clip(np.round(img), 0, 255).astype(np.uint8)

CELL_CLASSES = ("normal", "enlarged", "granular", "binucleate", "lobulated", "vacuolated")
def cell_image(rng):
    label = int(rng.integers(len(CELL_CLASSES)))
    cx, cy = 14 + rng.uniform(-2.5, 2.5, size=2)
    a = rng.uniform(8, 11); b = a * rng.uniform(0.7, 1.0); ang = rng.uniform(0, 2 * np.pi)
    c = _canvas(); d = ImageDraw.Draw(c)
    d.polygon(_poly(cx, cy, lambda t: a * b / np.sqrt((b * np.cos(t)) ** 2 + (a * np.sin(t)) ** 2), ang), fill=int(rng.integers(100, 150)))
    nuc = _canvas(); dn = ImageDraw.Draw(nuc)
    nx, ny = cx + rng.uniform(-1.5, 1.5), cy + rng.uniform(-1.5, 1.5)
    lvl = int(rng.integers(190, 250))
    if label == 3:
        r = rng.uniform(0.2, 0.28) * a; off = r * rng.uniform(1.05, 1.3); phi = rng.uniform(0, np.pi)
        for s in (-1, 1): dn.polygon(_poly(nx + s * off * np.cos(phi), ny + s * off * np.sin(phi), lambda t: np.full_like(t, r), 0), fill=lvl)
    else:
        ratio = rng.uniform(0.44, 0.58) if label == 1 else rng.uniform(0.28, 0.42)
        r0 = ratio * a
        if label == 4:
            k, amp, ph = int(rng.integers(3, 6)), rng.uniform(0.18, 0.3), rng.uniform(0, 2 * np.pi)
            dn.polygon(_poly(nx, ny, lambda t: r0 * (1 + amp * np.sin(k * t + ph)), 0), fill=lvl)
        else:
            dn.polygon(_poly(nx, ny, lambda t: np.full_like(t, r0), 0), fill=lvl)
    img, nucleus = _down(c), _down(nuc)
    mask = nucleus / max(lvl, 1)
    if label == 2: nucleus = nucleus * (1 + rng.uniform(0.25, 0.4) * rng.standard_normal(nucleus.shape))
    img = img * (1 - mask) + nucleus
    if label == 5:
        v = _canvas(); dv = ImageDraw.Draw(v)
        for _ in range(int(rng.integers(2, 5))):
            t, rr = rng.uniform(0, 2 * np.pi), rng.uniform(0.6, 0.85) * b
            dv.polygon(_poly(cx + rr * np.cos(t), cy + rr * np.sin(t), lambda tt: np.full_like(tt, rng.uniform(1.0, 1.6)), 0), fill=255)
        img = img * (1 - 0.8 * _down(v) / 255)
    img = img + rng.uniform(10, 40)
    return _finish(img, rng, blur=BLUR, noise=NOISE), label
BLUR, NOISE = (0.3, 0.8), (3, 8)

def _field(rng, sigma): 
    f = ndimage.gaussian_filter(rng.standard_normal((S, S)), sigma); return f / (f.std() + 1e-9)
LAND_CLASSES = ("cropland", "residential", "forest", "water", "highway", "river", "pasture", "industrial")
def land_image(rng):
    label = int(rng.integers(len(LAND_CLASSES)))
    yy, xx = np.mgrid[0:S, 0:S].astype(float)
    base = rng.uniform(70, 140); img = base + 12 * _field(rng, 2.0)
    th = rng.uniform(0, np.pi)
    if label == 0:
        u = xx * np.cos(th) + yy * np.sin(th); img = base + 25 * np.sign(np.sin(2 * np.pi * u / rng.uniform(4, 7) + rng.uniform(0, 6))) + 8 * _field(rng, 1)
    elif label == 1:
        c = _canvas(); d = ImageDraw.Draw(c); p = rng.uniform(5, 7)
        for i in np.arange(-S, 2 * S, p):
            for j in np.arange(-S, 2 * S, p):
                x0 = 14 + (i - 14) * np.cos(th) - (j - 14) * np.sin(th); y0 = 14 + (i - 14) * np.sin(th) + (j - 14) * np.cos(th)
                d.polygon(_poly(x0, y0, lambda t: np.full_like(t, 1.6), th, n=4), fill=255)
        img = img * 0.8 + 0.35 * _down(c)
    elif label == 2: img = base * 0.7 + 30 * _field(rng, 0.8)
    elif label == 3: img = base * 0.4 + 6 * _field(rng, 3) + 3 * np.sin(2 * np.pi * (xx * np.cos(th) + yy * np.sin(th)) / 3)
    elif label in (4, 5):
        u = (xx - 14) * np.cos(th) + (yy - 14) * np.sin(th) + rng.uniform(-5, 5)
        v = -(xx - 14) * np.sin(th) + (yy - 14) * np.cos(th)
        if label == 5: u = u + rng.uniform(2, 4) * np.sin(2 * np.pi * v / rng.uniform(12, 20) + rng.uniform(0, 6))
        w = rng.uniform(1.5, 2.5)
        img = np.where(np.abs(u) < w, (base + 70) if label == 4 else base * 0.35, img)
    elif label == 6: img = base + 15 * _field(rng, 3.5)
    elif label == 7:
        c = _canvas(); d = ImageDraw.Draw(c)
        for _ in range(int(rng.integers(2, 4))):
            x0, y0, w, h = rng.uniform(0, 20), rng.uniform(0, 20), rng.uniform(5, 11), rng.uniform(5, 11)
            d.rectangle([x0 * SS, y0 * SS, (x0 + w) * SS, (y0 + h) * SS], fill=int(rng.integers(150, 255)))
        m = _down(c); img = np.where(m > 0, m * 0.5 + img * (1 - m / 255) , img)
    img = (img - img.mean()) * rng.uniform(0.7, 1.3) + img.mean() + rng.uniform(-20, 20)
    return _finish(img, rng), label

SPEC_CLASSES = 8
def spectral_image(rng):
    "Gaussian random fields: class = peak frequency (4 bands) x oriented or isotropic; orientation random."
    label = int(rng.integers(SPEC_CLASSES))
    band, oriented = label % 4, label // 4
    fy, fx = np.meshgrid(np.fft.fftfreq(S), np.fft.fftfreq(S), indexing="ij")
    f = np.hypot(fx, fy); th = rng.uniform(0, np.pi)
    f0 = [0.08, 0.15, 0.24, 0.35][band] * rng.uniform(0.9, 1.1)
    amp = np.exp(-((f - f0) ** 2) / (2 * 0.03 ** 2))
    if oriented: amp = amp * np.exp(-(np.angle(np.exp(2j * (np.arctan2(fy, fx) - th)))) ** 2 / (2 * 0.35 ** 2))
    field = np.real(np.fft.ifft2(amp * np.exp(2j * np.pi * rng.uniform(size=(S, S)))))
    img = 128 + rng.uniform(25, 45) * field / (field.std() + 1e-9)
    return _finish(img, rng, blur=(0.0, 0.01), noise=(4, 12)), label

CANDIDATES = {"cells": (cell_image, len(CELL_CLASSES)), "landcover": (land_image, len(LAND_CLASSES)), "spectral": (spectral_image, SPEC_CLASSES)}

def cells_v(blur, noise):
    def draw(rng):
        global BLUR, NOISE
        BLUR, NOISE = blur, noise
        return cell_image(rng)
    return draw
CANDIDATES["cells_b"] = (cells_v((0.0, 0.4), (2, 5)), len(CELL_CLASSES))
CANDIDATES["cells_c"] = (cells_v((0.0, 0.01), (1, 3)), len(CELL_CLASSES))

EUROSAT_CLASSES = ("annual_crop", "permanent_crop", "pasture", "forest", "herbaceous", "residential", "industrial", "highway", "river", "sea_lake")
def _dots(th, period, radius, jitter, rng, level=255):
    c = _canvas(); d = ImageDraw.Draw(c)
    for i in np.arange(-S, 2 * S, period):
        for j in np.arange(-S, 2 * S, period):
            x0 = 14 + (i - 14) * np.cos(th) - (j - 14) * np.sin(th) + rng.uniform(-jitter, jitter)
            y0 = 14 + (i - 14) * np.sin(th) + (j - 14) * np.cos(th) + rng.uniform(-jitter, jitter)
            if -3 < x0 < S + 3 and -3 < y0 < S + 3:
                d.polygon(_poly(x0, y0, lambda t: np.full_like(t, radius), th, n=4), fill=level)
    return _down(c) / 255
def eurosat_image(rng):
    label = int(rng.integers(len(EUROSAT_CLASSES)))
    yy, xx = np.mgrid[0:S, 0:S].astype(float)
    base = rng.uniform(70, 150); th = rng.uniform(0, np.pi)
    u = (xx - 14) * np.cos(th) + (yy - 14) * np.sin(th); v = -(xx - 14) * np.sin(th) + (yy - 14) * np.cos(th)
    ground = base + 12 * _field(rng, rng.uniform(1.5, 3.5))
    if label == 0: img = ground + 22 * np.sin(2 * np.pi * u / rng.uniform(3, 4.5) + rng.uniform(0, 6))
    elif label == 1: img = ground * (1 - 0.45 * _dots(th, rng.uniform(4.5, 6.5), rng.uniform(1.0, 1.5), 0.3, rng))
    elif label == 2: img = base + 14 * _field(rng, rng.uniform(2.5, 4))
    elif label == 3: img = base * 0.8 + 22 * _field(rng, rng.uniform(0.6, 1.0))
    elif label == 4: img = base + 18 * _field(rng, rng.uniform(1.2, 2.0))
    elif label == 5: img = ground * 0.85 + 90 * _dots(th, rng.uniform(4, 5.5), rng.uniform(1.2, 1.7), 0.6, rng)
    elif label == 6:
        c = _canvas(); d = ImageDraw.Draw(c)
        for _ in range(int(rng.integers(2, 5))):
            x0, y0, w, h = rng.uniform(-2, 22), rng.uniform(-2, 22), rng.uniform(4, 10), rng.uniform(4, 10)
            d.rectangle([x0 * SS, y0 * SS, (x0 + w) * SS, (y0 + h) * SS], fill=int(rng.integers(120, 255)))
        m = _down(c) / 255; img = ground * (1 - m) + m * (base + rng.uniform(40, 90))
    elif label in (7, 8):
        off = rng.uniform(-6, 6); w = rng.uniform(1.2, 2.5)
        if label == 8: off = off + rng.uniform(2, 4) * np.sin(2 * np.pi * v / rng.uniform(10, 20) + rng.uniform(0, 6))
        band = np.clip(w - np.abs(u - off) + 0.5, 0, 1)
        img = ground * (1 - band) + band * ((base + rng.uniform(50, 90)) if label == 7 else base * 0.4)
    else: img = base * rng.uniform(0.35, 0.6) + 4 * _field(rng, 2) + 2.5 * np.sin(2 * np.pi * u / rng.uniform(2.5, 4))
    img = (img - img.mean()) * rng.uniform(0.8, 1.2) + img.mean()
    return _finish(img, rng, blur=(0.2, 0.6), noise=(3, 7)), label
CANDIDATES["eurosat"] = (eurosat_image, len(EUROSAT_CLASSES))

def eurosat_haze(rng):
    image, label = eurosat_image(rng)
    haze = _field(rng, rng.uniform(4, 7)); haze = (haze - haze.min()) / (np.ptp(haze) + 1e-9)
    strength = rng.uniform(0.0, 0.6)
    img = image * (1 - strength * haze) + strength * haze * rng.uniform(170, 230)
    return np.clip(np.round(img), 0, 255).astype(np.uint8), label
CANDIDATES["eurosat_haze"] = (eurosat_haze, len(EUROSAT_CLASSES))

def _cover(rng, label, base, th, u, v, ground):
    if label == 0: return ground + 22 * np.sin(2 * np.pi * u / rng.uniform(3, 4.5) + rng.uniform(0, 6))
    if label == 1: return ground * (1 - 0.45 * _dots(th, rng.uniform(4.5, 6.5), rng.uniform(1.0, 1.5), 0.3, rng))
    if label == 2: return base + 14 * _field(rng, rng.uniform(2.5, 4))
    if label == 3: return base * 0.8 + 22 * _field(rng, rng.uniform(0.6, 1.0))
    if label == 4: return base + 18 * _field(rng, rng.uniform(1.2, 2.0))
    if label == 5: return ground * 0.85 + 90 * _dots(th, rng.uniform(4, 5.5), rng.uniform(1.2, 1.7), 0.6, rng)
    if label == 6:
        c = _canvas(); d = ImageDraw.Draw(c)
        for _ in range(int(rng.integers(2, 5))):
            x0, y0, w, h = rng.uniform(-2, 22), rng.uniform(-2, 22), rng.uniform(4, 10), rng.uniform(4, 10)
            d.rectangle([x0 * SS, y0 * SS, (x0 + w) * SS, (y0 + h) * SS], fill=int(rng.integers(120, 255)))
        m = _down(c) / 255; return ground * (1 - m) + m * (base + rng.uniform(40, 90))
    if label in (7, 8):
        off = rng.uniform(-6, 6); w = rng.uniform(1.2, 2.5)
        if label == 8: off = off + rng.uniform(2, 4) * np.sin(2 * np.pi * v / rng.uniform(10, 20) + rng.uniform(0, 6))
        band = np.clip(w - np.abs(u - off) + 0.5, 0, 1)
        return ground * (1 - band) + band * ((base + rng.uniform(50, 90)) if label == 7 else base * 0.4)
    return base * rng.uniform(0.35, 0.6) + 4 * _field(rng, 2) + 2.5 * np.sin(2 * np.pi * u / rng.uniform(2.5, 4))

def eurosat_illum(rng):
    image, label = eurosat_image(rng)
    yy, xx = np.mgrid[0:S, 0:S].astype(float) - 14; d = rng.uniform(0, 2 * np.pi)
    ramp = (xx * np.cos(d) + yy * np.sin(d)) / 14 * rng.uniform(0, 45)
    img = 255 * (np.clip(image + ramp, 0, 255) / 255) ** rng.uniform(0.6, 1.6)
    return np.clip(np.round(img), 0, 255).astype(np.uint8), label

def eurosat_mixed(rng):
    label = int(rng.integers(len(EUROSAT_CLASSES)))
    other = int((label + rng.integers(1, len(EUROSAT_CLASSES))) % len(EUROSAT_CLASSES))
    yy, xx = np.mgrid[0:S, 0:S].astype(float)
    base = rng.uniform(70, 150); th = rng.uniform(0, np.pi)
    u = (xx - 14) * np.cos(th) + (yy - 14) * np.sin(th); v = -(xx - 14) * np.sin(th) + (yy - 14) * np.cos(th)
    ground = base + 12 * _field(rng, rng.uniform(1.5, 3.5))
    main, second = _cover(rng, label, base, th, u, v, ground), _cover(rng, other, base * rng.uniform(0.8, 1.2), th, u, v, ground)
    d = rng.uniform(0, 2 * np.pi); w = (xx - 14) * np.cos(d) + (yy - 14) * np.sin(d)
    cut = np.quantile(w, rng.uniform(0.6, 0.8))
    mask = np.clip(cut - w + 0.5, 0, 1)
    img = main * mask + second * (1 - mask)
    img = (img - img.mean()) * rng.uniform(0.8, 1.2) + img.mean()
    return _finish(img, rng, blur=(0.2, 0.6), noise=(3, 7)), label
CANDIDATES["eurosat_illum"] = (eurosat_illum, len(EUROSAT_CLASSES))
CANDIDATES["eurosat_mixed"] = (eurosat_mixed, len(EUROSAT_CLASSES))

BLOOD_CLASSES = ("lymphocyte", "monocyte", "neutrophil", "band", "eosinophil", "basophil")
def _disc(d, x, y, r, level):
    d.ellipse([(x - r) * SS, (y - r) * SS, (x + r) * SS, (y + r) * SS], fill=level)
def blood_image(rng):
    label = int(rng.integers(len(BLOOD_CLASSES)))
    name = BLOOD_CLASSES[label]
    cx, cy = 14 + rng.uniform(-JIT, JIT, size=2); R = rng.uniform(9.5, 12.5); rot = rng.uniform(0, 2 * np.pi)
    bg = rng.uniform(20, 60)
    cyt = _canvas(); dc = ImageDraw.Draw(cyt); _disc(dc, cx, cy, R, 255)
    nuc = _canvas(); dn = ImageDraw.Draw(nuc)
    def at(dx, dy):  # rotate an offset (in units of R) about the centre
        return cx + R * (dx * np.cos(rot) - dy * np.sin(rot)), cy + R * (dx * np.sin(rot) + dy * np.cos(rot))
    if name == "lymphocyte": _disc(dn, *at(rng.uniform(-0.1, 0.1), 0), R * rng.uniform(0.68, 0.8), 255)
    elif name == "monocyte":
        _disc(dn, *at(0, 0), R * rng.uniform(0.55, 0.65), 255); _disc(dn, *at(rng.uniform(0.55, 0.7), 0), R * rng.uniform(0.3, 0.4), 0)
    elif name in ("neutrophil", "eosinophil"):
        lobes = int(rng.integers(3, 5)) if name == "neutrophil" else 2
        phi0, r = rng.uniform(0, 2 * np.pi), R * rng.uniform(0.22, 0.28) * (1.25 if lobes == 2 else 1)
        pts = [at(0.45 * np.cos(phi0 + k * 2 * np.pi / lobes * 0.8), 0.45 * np.sin(phi0 + k * 2 * np.pi / lobes * 0.8)) for k in range(lobes)]
        for p in pts: _disc(dn, *p, r, 255)
        dn.line([(x * SS, y * SS) for x, y in pts], fill=255, width=int(SS * 0.8))
    elif name == "band":
        r0, w = R * rng.uniform(0.45, 0.55), R * rng.uniform(0.16, 0.22)
        a0 = np.degrees(rot) + rng.uniform(-20, 20); span = rng.uniform(200, 280)
        box = [(cx - r0 - w) * SS, (cy - r0 - w) * SS, (cx + r0 + w) * SS, (cy + r0 + w) * SS]
        dn.arc(box, a0, a0 + span, fill=255, width=int(2 * w * SS))
    else: _disc(dn, *at(0, 0), R * rng.uniform(0.45, 0.55), 255)
    cell, nucleus = _down(cyt) / 255, _down(nuc) / 255 * _down(cyt) / 255
    img = bg + cell * (rng.uniform(100, 140) - bg) + nucleus * rng.uniform(80, 120)
    if name in ("eosinophil", "basophil"):
        g = _canvas(); dg = ImageDraw.Draw(g)
        for _ in range(int(rng.integers(25, 45))):
            a, rr = rng.uniform(0, 2 * np.pi), R * np.sqrt(rng.uniform(0, 0.9))
            _disc(dg, cx + rr * np.cos(a), cy + rr * np.sin(a), rng.uniform(0.6, 0.9), 255)
        gran = _down(g) / 255 * cell
        img = img + gran * (rng.uniform(50, 80) if name == "eosinophil" else -rng.uniform(60, 90))
    return _finish(img, rng, blur=(0.2, 0.6), noise=(3, 7)), label
JIT = 1.5
CANDIDATES["blood"] = (blood_image, len(BLOOD_CLASSES))
def blood_j(rng):
    global JIT
    JIT = 4.0
    try: return blood_image(rng)
    finally: JIT = 1.5
CANDIDATES["blood_j"] = (blood_j, len(BLOOD_CLASSES))
