"""How profiling listens to generation: the one hooks protocol, :class:`glm4v.generate.GenerationHooks`
(``on_event(name)``), which both the plain decode loop and the engine call, fanned out to several listeners.

The decode loop calls ``hooks.on_event("prefill_start" | "vision_start" | "vision_end" | "first_token" | "token")``;
the profiler adds its own marks around a request ("request_start", "preprocess_end", "end"). Listeners that care
about *phases* (memory samplers) map events to the phase that begins with them.
"""

from __future__ import annotations

from glm4v.generate import GenerationHooks

# event → the phase that starts with it. "vision" sits inside the prefill: a peak there counts for the prefill too.
PHASE_AFTER_EVENT = {
    "request_start": "preprocess",
    "preprocess_end": "prefill",
    "prefill_start": "prefill",
    "vision_start": "vision",
    "vision_end": "prefill",
    "first_token": "decode",
    "end": "after_request",
}
REQUEST_PHASES = ("vision", "prefill", "decode")  # the phases whose peaks a profile reports


Listener = GenerationHooks  # what each fanned-out listener implements


class Fanout:
    """One hooks object for :func:`glm4v.generate.generate` that forwards each event to several listeners, in
    order (put the timer first so its timestamp is not delayed by the others)."""

    def __init__(self, *listeners: Listener | None):
        self.listeners = [x for x in listeners if x is not None]

    def on_event(self, name: str) -> None:
        for listener in self.listeners:
            listener.on_event(name)


class PhaseTracker:
    """Base for listeners that only need to know which phase is running: override :meth:`set_phase`."""

    def on_event(self, name: str) -> None:
        phase = PHASE_AFTER_EVENT.get(name)
        if phase is not None:
            self.set_phase(phase)

    def set_phase(self, phase: str) -> None:  # pragma: no cover - interface
        raise NotImplementedError
