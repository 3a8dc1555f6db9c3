"""Hatchling build hook: compile the simulated NVML library (native/nvml_sim.c) with the system C compiler.

The library is only for tests and demos (the NVML backend run without a GPU), so a missing compiler
is not fatal: the build warns and ships the C source, and ``dualscale.device.nvml_sim`` compiles it
on first use. Wheels that contain the library are tagged for the platform.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

from hatchling.builders.hooks.plugin.interface import BuildHookInterface

LIBRARY = "libnvidia-ml.so.1"
CFLAGS = ["-O2", "-shared", "-fPIC", "-fvisibility=hidden", f"-Wl,-soname,{LIBRARY}"]


class CustomBuildHook(BuildHookInterface):
    PLUGIN_NAME = "custom"

    def initialize(self, version: str, build_data: dict[str, Any]) -> None:
        if self.target_name != "wheel":
            return
        root = Path(self.root)
        src = root / "native" / "nvml_sim.c"
        build_data["force_include"][str(src)] = "dualscale/_native/nvml_sim.c"
        out_dir = root / "build" / "native"
        out_dir.mkdir(parents=True, exist_ok=True)
        out = out_dir / LIBRARY
        cc = shutil.which("cc") or shutil.which("gcc")
        if cc is None or not sys.platform.startswith("linux"):
            print("dualscale build: no C compiler (or not Linux): the simulated NVML is compiled on first use",
                  file=sys.stderr)
            return
        r = subprocess.run([cc, *CFLAGS, "-o", str(out), str(src)], capture_output=True, text=True)
        if r.returncode != 0:
            print(f"dualscale build: compiling native/nvml_sim.c failed, compiled on first use instead:\n{r.stderr}",
                  file=sys.stderr)
            return
        if version == "editable":
            # editable installs import from src/: put the library (untracked) next to the package
            dest = root / "src" / "dualscale" / "_native"
            dest.mkdir(exist_ok=True)
            shutil.copy2(out, dest / LIBRARY)
            return
        build_data["force_include"][str(out)] = f"dualscale/_native/{LIBRARY}"
        build_data["pure_python"] = False
        build_data["infer_tag"] = True
