"""Deliberate mistakes that the test suite must catch: each one is applied to a copy of the library and the tests
that cover it are run; a mistake that leaves them green is reported. Not collected by pytest; run it by hand:

    python tests/mutants.py            # every mistake (a few minutes on 2 CPU cores)
    python tests/mutants.py --fast     # the subset CI runs (each caught within seconds)
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
        "inversion/ddim.py", 'if self.prediction == "v_prediction":', "if False:", ["tests/test_inversion.py"]),
    "subtract-ignored": (
        "edits.py", "mask = mask & ~(keep_out[:1] | keep_out)", "mask = mask", ["tests/test_edits.py"]),
    "blend-map-size": (
        "edits.py", "side = self.res or run.map_side", "side = self.res or min(run.sides)", ["tests/test_edits.py"]),
    "self-steps-ignored": (
        "edits.py", "if not self.self_range[0] <= site.step < self.self_range[1]:", "if False:",
        ["tests/test_edits.py"]),
    "null-text-loss-rises": (
        "inversion/ddim.py", "            loss.backward()\n            opt.step()", "            (-loss).backward()\n"
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
        "inversion/ddim.py", "        pipe.scheduler = original\n", "        pass\n", ["tests/test_inversion.py"]),
    # input checks (issue "hostile inputs")
    "foreign-file-replaced": (
        "outputs.py", "if path.exists() and not (owned is not None and owned(path)):", "if False:",
        ["tests/test_hostile.py::test_invert_never_touches_the_users_files"]),
    "link-followed": (
        "outputs.py", "    if path.is_symlink():\n        raise InputError(f\"{what}", "    if False:\n        raise "
        "InputError(f\"{what}", ["tests/test_hostile.py::test_invert_never_touches_the_users_files"]),
    "pixels-unchecked": (
        "images.py", "if width * height > max_pixels:", "if False:",
        ["tests/test_hostile.py::test_ui_refuses_too_many_targets_and_bad_uploads"]),
    "sixteen-bits-clipped": (
        "images.py", "if mode.startswith(\"I;16\") or mode == \"I\":", "if False:",
        ["tests/test_hostile.py::test_images_of_high_bit_depth_are_scaled_not_clipped"]),
    "inversion-tensors-unchecked": (
        "inversion/record.py", "if t.ndim != ndim or (floating and not t.is_floating_point())",
        "if False and (t.ndim != ndim)",
        ["tests/test_hostile.py::test_a_spoiled_inversion_file_is_one_sentence_before_the_model_loads"]),
    "yaml-aliases-allowed": (
        "study.py", "if self.check_event(yaml.AliasEvent):", "if False:",
        ["tests/test_hostile.py::test_a_refused_study_leaves_nothing"]),
    "case-limit-ignored": (
        "study.py", "if total > MAX_CASES:", "if False:",
        ["tests/test_study.py::test_a_study_over_the_case_limit_is_refused_before_its_cases_are_built"]),
    "sweep-unlocked": (
        "sweep.py", "fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)", "pass", ["tests/test_hostile.py::"
        "test_sweeps_resume_past_a_corrupt_record_and_a_killed_case_and_refuse_a_second_writer"]),
    "sigterm-default": (
        "outputs.py", "        signal.signal(signal.SIGTERM, handler)", "        pass",
        ["tests/test_hostile.py::test_sigterm_while_writing_exits_143_and_leaves_nothing"]),
    # the engine's other modules
    "joint-text-marker-lost": (
        "joint.py", "marker[:, :, text, 0] = 1", "pass", ["tests/test_joint.py"]),
    "joint-window-first-rows": (  # every window taken from the first rows: SD3's conditional rows are the last
        "joint.py", "t.storage_offset() + rows.start * sb + tokens.start * st",
        "t.storage_offset() + tokens.start * st",
        ["tests/test_joint.py::test_controller_sees_each_prompts_own_conditional_rows"]),
    "joint-edit-change-lost": (
        "joint.py", "old = blocks() if written else probs", "old = probs", ["tests/test_joint.py"]),
    "fireflow-as-euler": (
        "flow.py", "end = x - d / 2 * self._velocity + d * v", "end = x + d * v", ["tests/test_flow.py"]),
    "word-tokens-overreach": (
        "tokens.py", "if e > s and s < m.end() and e > m.start()", "if e > s and s < m.end()",
        ["tests/test_tokens.py", "tests/test_alignment.py"]),
    "refine-off-by-one": (
        "alignment.py", "index[j + head], weight[j + head] = i + head, 1.0",
        "index[j + head], weight[j + head] = i, 1.0",
        ["tests/test_alignment.py"]),
    "store-counts-frozen": (
        "store.py", "                self.counts[name] += 1", "                pass", ["tests/test_attention.py"]),
    "flux-grid-read-every-step": (
        "families/flux.py", 'if cache.get("ids") is not ids:', "if True:",
        ["tests/test_syncs.py::test_controlled_loops_read_nothing_on_the_host_that_stock_does_not"]),
    "unconditional-call-edited": (
        "joint.py", "router.passive = router.calls > 0", "router.passive = False",
        ["tests/test_joint.py::test_flux2_controller_sees_the_conditional_call_only"]),
    "conditional-rows-always-last": (
        "routing.py", "return slice(0, n) if self.conditional_first else", "return",
        ["tests/test_joint.py::test_zimage_controller_sees_the_conditional_rows_which_come_first"]),
    "padded-text-keys-attended": (
        "joint.py", "mask = call.get(\"_key_mask\")", "mask = None",
        ["tests/test_joint.py::test_qwenimage_padded_text_gets_no_attention_and_edits_keep_the_source"]),
    # limits and silent nonsense (issue "sweeps that stop when told")
    "non-finite-unchecked": (
        "generation.py", "if not bool(torch.isfinite(final[\"latents\"]).all()):", "if False:",
        ["tests/test_limits.py::test_an_overflowing_guidance_or_factor_is_an_error_not_a_black_picture"]),
    "control-tokens-read": (
        "tokens.py", "found = [t for t in control_tokens(tokenizer) if t in prompt]", "found = []",
        ["tests/test_limits.py::test_control_tokens_in_a_prompt_are_refused"]),
    "template-opening-unaligned": (
        "alignment.py", "mapper[range(head), range(head)] = 1.0", "mapper[0, 0] = 1.0",
        ["tests/test_joint.py::test_flux2_words_sit_inside_the_chat_template_and_edits_keep_it_aligned"]),
    # every family all the way: the adapters' real-image sides and concept streams
    "qwen-cfg-not-rescaled": (
        "families/qwenimage.py",
        "return guided_v * (cond.norm(dim=-1, keepdim=True) / guided_v.norm(dim=-1, keepdim=True))",
        "return guided_v",
        ["tests/test_flow_families.py::test_the_velocity_is_the_loops_own_and_the_grid_its_grid"]),
    "zimage-concepts-ungated": (
        "families/zimage.py", "stream = stream + gate_msa * block.attention_norm2(", "stream = stream + (",
        ["tests/test_concepts.py::test_the_concept_stream_is_each_stock_block_with_the_concepts_as_its_text"]),
    "qwen21-text-rows-not-causal": (  # Qwen-Image 2.1's text tokens attend causally: the adapter computes their rows
        "families/qwenimage21.py", "dtype=torch.bool, device=query.device).tril()",
        "dtype=torch.bool, device=query.device)", ["tests/test_qwenimage21.py"]),
    "flux3-step-end-ignored": (  # Flux.3's loop block drops the latents the controller returns (a local blend's)
        "families/flux3.py", 'if changed.get("latents") is not None:', "if False:",
        ["tests/test_flux3.py::test_the_latents_a_step_end_returns_are_the_next_steps_input"]),
    "flux3-guider-kept-changed": (  # the guider's scale is not put back after a generation
        "families/flux3.py", "        guider.guidance_scale, guider._enabled = saved\n", "        pass\n",
        ["tests/test_flux3.py::test_no_guidance_is_one_call_a_step_and_the_pipelines_own"]),
}
FAST = ("foreign-file-replaced", "sixteen-bits-clipped", "yaml-aliases-allowed", "case-limit-ignored",
        "word-tokens-overreach", "refine-off-by-one", "fireflow-as-euler")  # the CI's subset: each caught in seconds


def stale(name: str) -> str:
    """Why a mutant cannot be applied (its text is not in its file exactly once), or "" when it can."""
    file, old, _, _ = MUTANTS[name]
    path = ROOT / PKG / file
    if not path.exists():
        return f"{PKG}/{file} does not exist"
    found = path.read_text().count(old)
    return "" if found == 1 else f"expected its text once in {PKG}/{file}, found it {found} times"


def run(name: str) -> bool:
    """True when the mistake makes at least one of its tests fail. A mutant whose text the code no longer holds is
    reported and counts as not caught (its test may still be right, but nothing checks it), and the run goes on."""
    file, old, new, tests = MUTANTS[name]
    why = stale(name)
    if why:
        print(f"{name:<28} STALE  {why}", flush=True)
        return False
    with tempfile.TemporaryDirectory() as tmp:
        copy = Path(tmp) / "src"
        shutil.copytree(ROOT / "src", copy)
        path = copy / "prompt2prompt" / file
        path.write_text(path.read_text().replace(old, new))
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
    unknown = [n for n in argv if n != "--fast" and n not in MUTANTS]
    if unknown:
        print(f"unknown mutant(s) {', '.join(unknown)}; expected --fast or names from: {', '.join(MUTANTS)}")
        return 2
    names = list(FAST) if argv == ["--fast"] else argv or list(MUTANTS)
    missed = [n for n in names if not run(n)]
    print(f"{len(names) - len(missed)} of {len(names)} mistakes caught")
    return 1 if missed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
