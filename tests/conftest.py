"""Shared test setup: one thread per process (tests run in parallel under xdist), offline hub, a
fresh global RNG per test, and a guard that the session-wide tiny pipelines stay unchanged."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(1)

#: session pipelines handed out by the fixtures below → their fingerprint when built
_SESSION_PIPES: dict[str, tuple[object, tuple]] = {}


def _fingerprint(pipe) -> tuple:
    """What a test could change on a shared pipeline: every module's parameters (names, shapes,
    values, requires_grad), adapters (peft), train/eval mode, the scheduler (class and config)."""
    parts = []
    for name, comp in sorted(pipe.components.items()):
        if isinstance(comp, torch.nn.Module):
            with torch.no_grad():
                params = tuple((n, tuple(p.shape), p.requires_grad, float(p.double().sum()), float(p.double().abs().sum())) for n, p in comp.named_parameters())
            parts.append((name, type(comp).__name__, comp.training, bool(getattr(comp, "peft_config", None)), params))
        elif comp is not None and hasattr(comp, "config"):
            parts.append((name, type(comp).__name__, repr(dict(comp.config))))
        else:
            parts.append((name, type(comp).__name__))
    return tuple(parts)


def _session_pipe(name, build):
    pipe = build()
    _SESSION_PIPES[name] = (pipe, _fingerprint(pipe))
    return pipe


@pytest.fixture(autouse=True)
def _isolated_global_state():
    """Every test starts from the same global torch RNG state (whatever ran before it, in any order
    or worker), and may not change the session pipelines: deep-copy them before training or
    editing (a change fails the test that made it, at teardown)."""
    torch.manual_seed(0)
    yield
    for name, (pipe, before) in _SESSION_PIPES.items():
        if _fingerprint(pipe) != before:
            _SESSION_PIPES[name] = (pipe, _fingerprint(pipe))  # report once, in the test that changed it
            pytest.fail(f"this test changed the session fixture '{name}' (weights, adapters, mode or scheduler); "
                        "use copy.deepcopy(pipe) before training or editing it", pytrace=False)


@pytest.fixture(scope="session")
def tiny_sd3(tmp_path_factory):
    """A tiny random SD3 pipeline saved with save_pretrained and loaded back (offline). Shared by
    the whole session: read-only (deep-copy it to train or edit)."""
    from flowrl.pipelines.tiny import save_and_reload, tiny_sd3_pipeline

    return _session_pipe("tiny_sd3", lambda: save_and_reload(tiny_sd3_pipeline(), tmp_path_factory.mktemp("sd3")))


@pytest.fixture(scope="session")
def tiny_flux(tmp_path_factory):
    """A tiny random Flux pipeline (offline); read-only like ``tiny_sd3``."""
    from flowrl.pipelines.tiny import save_and_reload, tiny_flux_pipeline

    return _session_pipe("tiny_flux", lambda: save_and_reload(tiny_flux_pipeline(), tmp_path_factory.mktemp("flux")))


def _tiny_video(builder_name, tmp_path_factory):
    from flowrl.pipelines import tiny_video
    from flowrl.pipelines.tiny import save_and_reload

    def build():
        pipe = save_and_reload(getattr(tiny_video, builder_name)(), tmp_path_factory.mktemp(builder_name))
        return tiny_video.with_test_defaults(pipe)

    return _session_pipe(builder_name, build)


@pytest.fixture(scope="session")
def tiny_wan(tmp_path_factory):
    """A tiny random WanPipeline (save_pretrained → from_pretrained), 32×32, 5 frames by default."""
    return _tiny_video("tiny_wan_pipeline", tmp_path_factory)


@pytest.fixture(scope="session")
def tiny_hunyuan_video(tmp_path_factory):
    """A tiny random HunyuanVideo15Pipeline (reloaded), 32×32, 5 frames, short text context."""
    return _tiny_video("tiny_hunyuan_video15_pipeline", tmp_path_factory)


@pytest.fixture(scope="session")
def tiny_qwen_image(tmp_path_factory):
    """A tiny random QwenImagePipeline (reloaded), 64×64 (8×8 latents)."""
    return _tiny_video("tiny_qwen_image_pipeline", tmp_path_factory)


# ---- a test run leaves the checkout as it found it ------------------------------------------------

_REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _checkout_status() -> dict[str, tuple] | None:
    """``git status --porcelain --untracked-files=all`` lines of the checkout (gitignored paths are
    left out by git itself), each with its file's size and modification time (so a file already
    modified before the run and written again by a test counts too); None outside a git checkout
    or without git."""
    import subprocess

    try:
        out = subprocess.run(["git", "-C", _REPO_ROOT, "status", "--porcelain", "--untracked-files=all"],
                             capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.SubprocessError):
        return None
    if out.returncode != 0:
        return None
    status = {}
    for line in out.stdout.splitlines():
        try:
            st = os.stat(os.path.join(_REPO_ROOT, line[3:].split(" -> ")[-1].strip('"')))
            status[line] = (st.st_size, st.st_mtime_ns)
        except OSError:
            status[line] = None
    return status


def _is_controller(session) -> bool:
    """True in the one process that runs the session (not an xdist worker)."""
    return not hasattr(session.config, "workerinput")


def pytest_sessionstart(session):
    if _is_controller(session):
        session.config._flowrl_checkout_before = _checkout_status()


def pytest_sessionfinish(session, exitstatus):
    """Fail the session when tests created or changed files in the checkout: tests write only to
    tmp folders. Compares the git status at the end with the one at the start."""
    before = getattr(session.config, "_flowrl_checkout_before", None)
    if not _is_controller(session) or before is None:
        return
    after = _checkout_status()
    if after is None:
        return
    new = sorted(line for line, stat in after.items() if line not in before or before[line] != stat)
    if new:
        lines = "\n".join(f"  {line}" for line in new)
        print(f"\nflowrl: the test run left files in the checkout {_REPO_ROOT} (tests must write only to "
              f"tmp_path):\n{lines}", flush=True)
        if session.exitstatus == 0:
            session.exitstatus = pytest.ExitCode.TESTS_FAILED
