"""Test set-up: Triton runs in its interpreter on the CPU; hypothesis stays within CI's time."""

import os

# Must be set before any @triton.jit decorator runs (i.e. before fused_trim.triton is imported).
os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")

import pytest  # noqa: E402
from hypothesis import HealthCheck, settings  # noqa: E402

settings.register_profile(
    "ci", max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow], derandomize=True
)
settings.register_profile("dev", max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


def _patch_language_once_per_launch() -> None:
    """Triton's interpreter patches the language modules a kernel's globals name (``triton.language``,
    ``triton.language.core``) when a launch starts, restores them when it ends, and patches them
    again, to the same interpreted members, at every call of a nested ``@triton.jit`` function
    (``InterpretedFunction.__call__``). Those repeated patches (``inspect.getmembers`` over the
    modules) took half of every interpreted kernel's time in this suite. Inside a launch, a nested
    call whose modules are already patched skips its patch; the launch's own patch and restore and
    every other patch are unchanged, and so is what each kernel computes. Where the interpreter's
    internals differ from these, nothing is changed."""
    import inspect

    try:
        from triton import language as tl
        from triton.runtime import interpreter
    except ImportError:
        return
    original = getattr(interpreter, "_patch_lang", None)
    scope_type = getattr(interpreter, "_LangPatchScope", None)
    if original is None or scope_type is None or getattr(original, "_fused_trim_once", False):
        return
    patched: set[int] = set()  # ids of the language modules patched by the running launch
    active = [False]

    def langs_of(fn) -> set[int]:
        return {id(v) for v in fn.__globals__.values() if inspect.ismodule(v) and v in (tl, tl.core)}

    class _LaunchScope:
        def __init__(self, inner):
            self.inner = inner

        def restore(self) -> None:
            active[0] = False
            patched.clear()
            self.inner.restore()

    def patch_lang(fn):
        langs = langs_of(fn)
        if active[0]:
            if langs <= patched:  # a nested device function whose modules the launch has patched
                return scope_type()
            patched.update(langs)
            return original(fn)
        scope = original(fn)
        active[0] = True
        patched.update(langs)
        return _LaunchScope(scope)

    patch_lang._fused_trim_once = True
    interpreter._patch_lang = patch_lang


if os.environ.get("TRITON_INTERPRET") == "1":
    _patch_language_once_per_launch()


@pytest.fixture
def grid_select(monkeypatch):
    """Force Triton's multi-program select onto small problems, which the interpreter can run."""
    from fused_trim.triton import launch

    monkeypatch.setattr(launch, "SINGLE_PROGRAM_MAX_ROWS", 0)
    monkeypatch.setattr(launch, "GRID_BLOCK", 64)
