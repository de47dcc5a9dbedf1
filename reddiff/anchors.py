"""Published numbers for the "paper" columns of generated tables (from ../shared/ANCHORS.md).

Each entry: (task, sampler) -> {metric: (value, tag, source)}.  Tags: ``paper*`` (read from a public
transcription of the paper), ``unverified`` (use as approximate only), ``code``.  Units follow the paper:
KID x10^3, top-1 in percent, PSNR in dB.
"""
from __future__ import annotations

T1 = "RED-diff Table 1 (ImageNet-256, in2_20ff, 1k val)"
SR = "third-party table (ImageNet SR4, 1000 NFE)"
DDRM = "DDRM paper (ImageNet 1k, noiseless, 20 NFE)"
T2 = "RED-diff Table 2 (nonlinear)"
DPS_IN = "DPS paper (ImageNet, sigma_y=0.05, 1000 NFE)"

PAPER: dict[tuple[str, str], dict[str, tuple[float, str, str]]] = {
    ("inpaint_freeform", "reddiff"): {"psnr": (23.29, "paper*", T1), "ssim": (0.87, "paper*", T1), "kid": (0.86, "paper*", T1),
                                      "lpips": (0.10, "paper*", T1), "top1": (72.0, "paper*", T1)},
    ("inpaint_freeform", "dps"): {"psnr": (21.27, "unverified", T1), "ssim": (0.67, "unverified", T1), "kid": (15.28, "unverified", T1),
                                  "lpips": (0.26, "unverified", T1), "top1": (58.2, "unverified", T1)},
    ("inpaint_freeform", "pigdm"): {"psnr": (20.30, "unverified", T1), "ssim": (0.82, "unverified", T1), "kid": (4.50, "unverified", T1),
                                    "lpips": (0.12, "unverified", T1), "top1": (67.8, "unverified", T1)},
    ("inpaint_freeform", "ddrm"): {"psnr": (20.72, "unverified", T1), "ssim": (0.83, "unverified", T1), "kid": (2.5, "unverified", T1),
                                   "lpips": (0.14, "unverified", T1), "top1": (68.6, "unverified", T1)},
    ("sr4", "dps"): {"psnr": (23.86, "unverified", SR), "lpips": (0.337, "paper*", DPS_IN), "fid": (50.66, "paper*", DPS_IN)},
    ("sr4", "pigdm"): {"psnr": (25.22, "unverified", SR)},
    ("sr4", "reddiff"): {"psnr": (24.89, "unverified", SR)},
    ("sr4", "ddrm"): {"psnr": (26.55, "paper*", DDRM), "kid": (7.22, "paper*", DDRM)},
    ("deblur_uniform", "ddrm"): {"psnr": (35.64, "paper*", DDRM), "kid": (0.71, "paper*", DDRM)},
    ("hdr", "reddiff"): {"psnr": (25.23, "paper*", T2)},
    ("hdr", "dps"): {"psnr": (7.94, "paper*", T2)},
    ("deblur_nonlinear", "reddiff"): {"psnr": (45.00, "paper*", T2), "ssim": (0.987, "paper*", T2)},
    ("inpaint_box", "dps"): {"lpips": (0.262, "paper*", DPS_IN), "fid": (38.82, "paper*", DPS_IN)},
    ("inpaint_random", "dps"): {"lpips": (0.303, "paper*", DPS_IN), "fid": (35.87, "paper*", DPS_IN)},
    ("deblur_gauss_dps", "dps"): {"lpips": (0.444, "paper*", DPS_IN), "fid": (62.72, "paper*", DPS_IN)},
    ("deblur_motion", "dps"): {"lpips": (0.389, "paper*", DPS_IN), "fid": (56.08, "paper*", DPS_IN)},
}


def lookup(task: str, sampler: str) -> dict[str, tuple[float, str, str]]:
    return PAPER.get((task, sampler), {})
