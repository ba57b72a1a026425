"""Deliberate mistakes that the test suite must catch: each one is applied to a copy of the library and the tests
that cover it are run; a mistake that leaves them green is reported. Not collected by pytest; run it by hand:

    python tests/mutants.py            # every mistake (a few minutes on 2 CPU cores)
    python tests/mutants.py blend-pool # one of them

The working tree is never modified: the mistake goes into a temporary copy of src/ put first on PYTHONPATH.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PKG = "src/prompt2prompt"

# name: (file, the text as it is, the mistake, the test files that must fail)
MUTANTS = {
    "self-small-map-rule": (
        "edits.py", "return site.pixels <= self.self_pixels if self.self_pixels else max(site.res) <= self.self_side",
        "return True", ["tests/test_edits.py", "tests/test_reference.py"]),
    "blend-pool": (
        "edits.py", "maps = F.max_pool2d(maps, 3, stride=1, padding=1)", "pass", ["tests/test_edits.py"]),
    "refine-new-tokens": (
        "edits.py", "mapped = mapped * w + edited * (1 - w)", "mapped = mapped * w", ["tests/test_edits.py"]),
    "v-prediction-as-epsilon": (
        "inversion.py", 'if self.prediction == "v_prediction":', "if False:", ["tests/test_inversion.py"]),
    "subtract-ignored": (
        "edits.py", "mask = mask & ~(keep_out[:1] | keep_out)", "mask = mask", ["tests/test_edits.py"]),
    "blend-map-size": (
        "edits.py", "side = self.res or run.map_side", "side = self.res or min(run.sides)", ["tests/test_edits.py"]),
    "self-steps-ignored": (
        "edits.py", "if not self.self_range[0] <= site.step < self.self_range[1]:", "if False:",
        ["tests/test_edits.py"]),
    "null-text-loss-rises": (
        "inversion.py", "            loss.backward()\n            opt.step()", "            (-loss).backward()\n"
        "            opt.step()", ["tests/test_inversion.py"]),
    "noise-not-shared": (
        "generation.py", "generator=[_copy(generator) for _ in prompts],", "generator=None,",
        ["tests/test_attention.py", "tests/test_edits.py"]),
    "schedules-count-callbacks": (
        "edits.py", "self._tables(run.steps or self.fallback_steps)", "self._tables(self.fallback_steps or run.steps)",
        ["tests/test_edits.py"]),
    "processor-kwargs-dropped": (
        "attention.py", "call.__signature__ = inspect.signature(original.__call__)",
        "call.__signature__ = inspect.signature(lambda attn, hidden_states: None)", ["tests/test_attention.py"]),
    "reference-blend-before-edit": (
        "edits.py", "        return Controllers(p2p, blend, extra)", "        return Controllers(blend, p2p, extra)",
        ["tests/test_reference.py"]),
    "reference-schedule-rows": (
        "schedule.py", "n = steps + 1 if reference else steps", "n = steps", ["tests/test_reference.py"]),
    "pipeline-scheduler-kept": (
        "inversion.py", "        pipe.scheduler = original\n", "        pass\n", ["tests/test_inversion.py"]),
}


def run(name: str) -> bool:
    """True when the mistake makes at least one of its tests fail."""
    file, old, new, tests = MUTANTS[name]
    with tempfile.TemporaryDirectory() as tmp:
        copy = Path(tmp) / "src"
        shutil.copytree(ROOT / "src", copy)
        path = copy / "prompt2prompt" / file
        text = path.read_text()
        if text.count(old) != 1:
            sys.exit(f"{name}: expected the text once in {PKG}/{file}, found it {text.count(old)} times")
        path.write_text(text.replace(old, new))
        env = {**os.environ, "PYTHONPATH": f"{copy}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
        probe = subprocess.run([sys.executable, "-c", "import prompt2prompt; print(prompt2prompt.__file__)"],
                               env=env, capture_output=True, text=True, cwd=ROOT)
        assert probe.stdout.strip().startswith(str(copy)), probe
        out = subprocess.run([sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", *tests],
                             env=env, capture_output=True, text=True, cwd=ROOT)
    caught = out.returncode != 0
    failed = [line for line in out.stdout.splitlines() if line.startswith("FAILED")]
    print(f"{name:<28} {'caught' if caught else 'NOT CAUGHT'}  {failed[0][7:90] if failed else ''}", flush=True)
    return caught


def main(argv: list[str]) -> int:
    names = argv or list(MUTANTS)
    missed = [n for n in names if not run(n)]
    print(f"{len(names) - len(missed)} of {len(names)} mistakes caught")
    return 1 if missed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
