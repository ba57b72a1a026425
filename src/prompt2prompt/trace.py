"""Tracing your own pipeline call: maps (and an edit) from `pipe(...)` as you write it.

    import prompt2prompt as p2p

    with p2p.trace(pipe) as tc:                        # any supported pipeline
        image = pipe("a red circle and a blue square", num_inference_steps=30).images[0]
    tc.maps().word("circle").overlay(image)            # the call's own prompt, steps and settings

    with p2p.trace(pipe, edit=p2p.EditOptions(blend=("square", "triangle")),
                   prompts=["a red circle and a blue square", "a red circle and a blue triangle"]) as tc:
        images = pipe(["a red circle and a blue square", "a red circle and a blue triangle"],
                      generator=torch.Generator().manual_seed(0)).images

The call is the user's: its arguments, its own `callback_on_step_end` (left as it is) and its return value. While the
block runs, every attention layer goes through the recorder (and the edit); the prompts are read where the pipeline
encodes them (`encode_prompt`), and the steps are counted where it takes them (its scheduler's `step`, after which
an edit's local blend sets the latents), so nothing has to be passed to the call. Every processor and both wrapped
methods are restored when the block ends, whatever happens in it. One traced call at a time; a second call inside
the block starts a new trace (the maps are the last call's).
"""

from __future__ import annotations

import inspect
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

from .attention import control
from .edits import EditOptions, edit_controller, edit_controllers
from .errors import P2PError, PromptError
from .maps import CrossAttentionMaps, SelfAttentionMaps, cross_maps, self_maps
from .routing import Controllers
from .store import AttentionStore, RecordOptions
from .tokens import PromptTokens, batch_tokens


@dataclass
class Trace:
    """What the traced call left: its prompts as the model saw them, the recorded attention, an edit's last mask."""

    pipe: object
    store: AttentionStore
    prompts: list[str] = field(default_factory=list)
    tokens: list[PromptTokens] = field(default_factory=list)
    steps: int = 0  # denoising steps the call took
    max_sequence_length: int | None = None
    blend: object = None  # the edit's LocalBlend, if any

    def _check(self) -> None:
        if not self.steps:
            raise P2PError("nothing was traced: call the pipeline inside the `with p2p.trace(pipe) as tc:` block")
        if not self.tokens:
            raise PromptError("the traced call gave its text as prompt_embeds, not as prompts: pass prompts=[...] to "
                              "trace so that its maps can name their words")

    def maps(self, res: int | tuple[int, ...] | None = None, places: tuple[str, ...] | None = None,
             heads: tuple[int, ...] | None = None) -> CrossAttentionMaps:
        """Per-token cross-attention of the traced call, averaged over the chosen map sides, places, heads and its
        steps (as `AttendResult.maps`)."""
        self._check()
        from .loading import default_part

        settings = {"prompts": self.prompts, "steps": self.steps, "text_part": default_part(self.pipe), "traced": True}
        return cross_maps(self.store, self.tokens, res, places, heads, settings)

    def self_maps(self, res: int | None = None) -> SelfAttentionMaps:
        self._check()
        return self_maps(self.store, res)

    @property
    def mask(self):
        """The edit's last local-blend mask, (prompts, 1, h, w), or None."""
        return None if self.blend is None else self.blend.mask

    def _repr_png_(self) -> bytes | None:
        from .display import maps_picture, png

        return png(maps_picture(self.maps())) if self.steps and self.tokens else None

    def __repr__(self) -> str:
        return f"Trace({self.prompts!r}, {self.steps} steps, {len(self.store.sums)} layers recorded)"


def _bound(signature: inspect.Signature, args, kwargs) -> dict:
    """A call's arguments by name, as the method's signature binds them (defaults left out)."""
    try:
        return dict(signature.bind_partial(*args, **kwargs).arguments)
    except TypeError:
        return dict(kwargs)


@contextmanager
def trace(pipe, edit: EditOptions | None = None, prompts: list[str] | None = None,
          record: RecordOptions = RecordOptions(), max_sequence_length: int | None = None) -> Iterator[Trace]:
    """Record the attention of the pipeline calls made inside the block (and, with `edit`, control them as that
    Prompt-to-Prompt edit: `prompts` then names the call's prompts, source first, and the call must be given them).

    The prompts and the loop's steps are read from the call itself (the pipeline's `encode_prompt` and its
    scheduler's `step`, wrapped on this pipeline object for the block only); the user's callbacks are untouched."""
    if edit is not None and (not prompts or len(prompts) < 2):
        raise PromptError("an edit in a trace needs its prompts, source first: trace(pipe, edit=..., prompts=[source, "
                          "target, ...]), the same list the pipeline call is given")
    for name in ("encode_prompt", "scheduler"):
        if not hasattr(pipe, name):
            modular = " (a modular pipeline: p2p.attend and p2p.edit drive its blocks)" if hasattr(pipe, "blocks") \
                else ""
            raise P2PError(f"trace needs a pipeline with {name}; {type(pipe).__name__} has none{modular}")
    store = AttentionStore(record)
    result = Trace(pipe, store, max_sequence_length=max_sequence_length)
    controller, expected = store, None
    if edit is not None:
        expected = list(prompts)
        _, p2p, blend = edit_controllers(pipe, expected, edit, 0, max_sequence_length)
        result.blend = blend
        controller = Controllers(edit_controller(p2p, blend), store)  # the store sees what the model used
    state = {"looping": True}  # a new pipeline call starts at its first encode_prompt after a loop (or at the start)
    encode, step = pipe.encode_prompt, pipe.scheduler.step
    signatures = {"encode": inspect.signature(encode), "step": inspect.signature(step)}  # read once, not each step
    scheduler = pipe.scheduler
    own = {(id(obj), name): vars(obj)[name] for obj, name in ((pipe, "encode_prompt"), (scheduler, "step"))
           if name in vars(obj)}  # an attribute the object itself held (not its class's method): put back as it was

    with control(pipe, controller, prompts=len(expected) if expected else None) as router:

        def traced_encode(*args, **kwargs):
            if state["looping"]:  # the first encoding of a new call (a second one is its negative prompt's)
                state["looping"] = False
                named = _bound(signatures["encode"], args, kwargs)
                given = named.get("prompt")
                given = [given] if isinstance(given, str) else list(given) if given is not None else []
                if expected is not None and given and given != expected:
                    raise PromptError(f"the traced call was given the prompts {given}, but the trace's edit was made "
                                      f"for {expected}: give the call the same list")
                result.prompts = given or list(prompts or [])
                result.max_sequence_length = named.get("max_sequence_length", max_sequence_length)
                result.tokens = batch_tokens(pipe, result.prompts, result.max_sequence_length) if result.prompts \
                    else []
                copies = int(named.get("num_images_per_prompt") or 1)
                if expected is None:  # each prompt's rows: its conditional images, however the pipeline guides
                    router.prompts = len(result.prompts) * copies if result.prompts else None
                router.step, router.run, result.steps = 0, None, 0
                store.clear()
            return encode(*args, **kwargs)

        def traced_step(*args, **kwargs):
            out = step(*args, **kwargs)
            state["looping"] = True
            named = _bound(signatures["step"], args, kwargs)
            tuple_out = isinstance(out, tuple)
            latents = out[0] if tuple_out else out.prev_sample
            new = router.end_step(router.step, named.get("timestep"), latents)
            result.steps = router.step
            if new is None:
                return out
            if tuple_out:
                return (new, *out[1:])
            out.prev_sample = new
            return out

        pipe.encode_prompt, scheduler.step = traced_encode, traced_step  # on these objects only, for the block
        try:
            yield result
        finally:
            for obj, name in ((pipe, "encode_prompt"), (scheduler, "step")):
                if (id(obj), name) in own:
                    setattr(obj, name, own[(id(obj), name)])
                elif name in vars(obj):
                    delattr(obj, name)
