"""Turn the ``--model`` argument into a local checkpoint folder, downloading it from a model hub if needed.

The argument is read in this order:

1. an existing directory (``~`` expanded) is used as it is; a string that looks like a path (starts with ``/``,
   ``./``, ``../`` or ``~``, ends with ``/``, or has two or more separators before any ``@``) but does not exist is
   an error, never a hub id;
2. ``modelscope://ORG/NAME[@REVISION]`` — or a bare ``ORG/NAME[@REVISION]`` when ``GLM4V_USE_MODELSCOPE`` is truthy
   (1/true/yes/on) — comes from ModelScope (the optional ``modelscope`` package). ModelScope has no offline switch of
   its own, so ``HF_HUB_OFFLINE`` also keeps it off the network (its cache only); online, an unreachable ModelScope
   falls back to its cache;
3. any other ``ORG/NAME[@REVISION]`` comes from the Hugging Face Hub through ``huggingface_hub.snapshot_download``,
   which itself honours ``HF_HOME``/``HF_HUB_CACHE``, ``HF_ENDPOINT``, ``HF_HUB_OFFLINE`` and the token
   (``HF_TOKEN`` or ``hf auth login``). A cached snapshot is served without the network when offline or unreachable.

Only the files the loader reads are fetched (:data:`ALLOW_PATTERNS`): never ``*.bin``/``*.pt`` pickles nor the
repository's ``*.py`` remote code. A downloaded folder must then hold ``config.json``, ``tokenizer.model``,
``tokenizer_config.json`` and safetensors weights. Every failure is a :class:`ModelNotFoundError` with a one-line
message that says what to do (the library's own exception is logged at DEBUG).
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import warnings
from pathlib import Path

log = logging.getLogger(__name__)

# What the loader reads from a checkpoint (quant.loader, glm4v.checkpoint); anything else is not downloaded.
ALLOW_PATTERNS = (
    "config.json",
    "generation_config.json",
    "*.safetensors",
    "*.safetensors.index.json",
    "tokenizer.model",
    "tokenizer_config.json",
    "special_tokens_map.json",
)
REQUIRED_FILES = ("config.json", "tokenizer.model", "tokenizer_config.json")
MODELSCOPE_PREFIX = "modelscope://"
USE_MODELSCOPE_ENV = "GLM4V_USE_MODELSCOPE"
HUB_ID = re.compile(r"^(?P<repo>[A-Za-z0-9][\w.-]*/[\w.-]+)(?:@(?P<revision>[\w./-]+))?$")
_TRUTHY = {"1", "true", "yes", "on"}


class ModelNotFoundError(ValueError):
    """The ``--model`` argument names no usable checkpoint; the message is one line that says why and what to do."""


def describe_source(model: str) -> str:
    """Where :func:`resolve_model_path` would take ``model`` from: ``"folder"``, ``"huggingface"`` or ``"modelscope"``.

    No I/O beyond one ``isdir``: a string that is neither a folder nor a hub id counts as a (missing) folder.
    """
    model = model.strip()
    if os.path.isdir(os.path.expanduser(model)):
        return "folder"
    if model.startswith(MODELSCOPE_PREFIX):
        return "modelscope"
    if not _looks_like_path(model) and HUB_ID.match(model):
        return "modelscope" if _truthy(os.environ.get(USE_MODELSCOPE_ENV)) else "huggingface"
    return "folder"


def resolve_model_path(model: str, *, progress: bool = True) -> str:
    """The local checkpoint folder for ``model`` (see the module docstring), downloaded first if it is a hub id.

    ``progress=False`` silences the Hugging Face download bars (ModelScope always shows its file-count bar).
    """
    model = model.strip()
    source = describe_source(model)
    if source == "folder":
        path = os.path.expanduser(model)
        if not os.path.isdir(path):
            raise ModelNotFoundError(f"model folder {path} does not exist")
        return path
    if source == "modelscope":
        ident = model[len(MODELSCOPE_PREFIX) :] if model.startswith(MODELSCOPE_PREFIX) else model
        match = HUB_ID.match(ident)
        if not match:
            raise ModelNotFoundError(
                f"{model}: not a ModelScope model id (expected {MODELSCOPE_PREFIX}ORG/NAME[@REVISION])"
            )
        path = _from_modelscope(model, match["repo"], match["revision"])
        where = "ModelScope"
    else:
        match = HUB_ID.match(model)
        path = _from_huggingface(model, match["repo"], match["revision"], progress)
        where = "the Hugging Face Hub"
    check_downloaded(path, label=model)
    log.info("Model %s from %s: %s", model, where, path)
    return path


def check_downloaded(path: str | Path, *, label: str) -> None:
    """Raise :class:`ModelNotFoundError` unless ``path`` holds the files the loader needs (safetensors weights)."""
    folder = Path(path)
    missing = [name for name in REQUIRED_FILES if not (folder / name).is_file()]
    if not any(p.is_file() for p in folder.glob("*.safetensors")):
        missing.append("*.safetensors weights")
    if not missing:
        return
    pickles = sorted(p.name for pattern in ("*.bin", "*.pt", "*.pth") for p in folder.glob(pattern))
    found = f" (it holds {', '.join(pickles[:3])})" if pickles else ""
    raise ModelNotFoundError(
        f"{label}: the downloaded checkpoint ({_tilde(folder)}) has no {', '.join(missing)}{found}; only GLM-4V-9B "
        "safetensors checkpoints are supported (.bin/.pt pickles are refused)"
    )


# ---- Hugging Face ---------------------------------------------------------------------------------------------------
def _from_huggingface(label: str, repo: str, revision: str | None, progress: bool) -> str:
    from huggingface_hub import constants, errors, snapshot_download
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        HFValidationError,
        LocalEntryNotFoundError,
        OfflineModeIsEnabled,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    # huggingface_hub 2.x (cached tree listings): a cached snapshot known to be partial. Older versions lack it.
    incomplete_snapshot = getattr(errors, "IncompleteSnapshotError", _NeverRaised)
    endpoint, cache = constants.ENDPOINT, _tilde(constants.HF_HUB_CACHE)
    fetch = f"hf download {repo}" + (f" --revision {revision}" if revision else "")
    try:
        with _hf_progress_bars(progress):
            return snapshot_download(repo, revision=revision, allow_patterns=list(ALLOW_PATTERNS))
    except GatedRepoError:  # before RepositoryNotFoundError, its base class
        message = (
            f"{label}: {endpoint}/{repo} is gated: accept its terms on that page, then set HF_TOKEN "
            "(or run `hf auth login`)"
        )
    except RepositoryNotFoundError:
        message = f"{label}: no such model on {endpoint} (check the name; private models need HF_TOKEN)"
    except RevisionNotFoundError:
        message = f"{label}: {repo} has no revision {revision!r} on {endpoint}"
    except incomplete_snapshot as e:  # before LocalEntryNotFoundError, its base class
        offline = isinstance(e.__cause__, OfflineModeIsEnabled) or constants.is_offline_mode()
        why = "HF_HUB_OFFLINE is set" if offline else f"{endpoint} could not be reached"
        message = (
            f"{label}: the cached snapshot ({_tilde(e.snapshot_path)}) is incomplete (an interrupted download?) and "
            f"{why}: finish it with network access ({fetch})"
        )
    except (LocalEntryNotFoundError, OfflineModeIsEnabled) as e:
        cause = e if isinstance(e, OfflineModeIsEnabled) else e.__cause__
        if isinstance(cause, OfflineModeIsEnabled) or constants.is_offline_mode():
            message = (
                f"{label}: not in the Hugging Face cache ({cache}) and HF_HUB_OFFLINE is set: download it first "
                f"({fetch}) or unset HF_HUB_OFFLINE"
            )
        elif isinstance(cause, HfHubHTTPError):
            message = f"{label}: {endpoint} refused it ({_http_status(cause)}) and it is not in the cache ({cache})"
        else:
            message = _unreachable(label, endpoint, cause, cache)
    except HFValidationError:
        message = f"{label}: not a valid Hugging Face model id (ORG/NAME: letters, digits, '-', '_', '.'; no '--')"
    except HfHubHTTPError as e:
        message = f"{label}: {endpoint} answered {_http_status(e)}"
    except _transport_errors() as e:  # e.g. a proxy error, which snapshot_download does not absorb
        message = _unreachable(label, endpoint, e, cache)
    log.debug("snapshot_download(%r, revision=%r) failed", repo, revision, exc_info=True)
    raise ModelNotFoundError(_one_line(message)) from None


class _NeverRaised(Exception):
    """Stands for an exception class the installed library does not have."""


@contextlib.contextmanager
def _hf_progress_bars(enabled: bool):
    """Leave huggingface_hub's bars as they are, or switch them off for the block and back on after it."""
    from huggingface_hub.utils import are_progress_bars_disabled, disable_progress_bars, enable_progress_bars

    if enabled or are_progress_bars_disabled():
        yield
        return
    with warnings.catch_warnings():  # HF_HUB_DISABLE_PROGRESS_BARS=0 wins, with a warning: that was the user's choice
        warnings.simplefilter("ignore")
        disable_progress_bars()
    try:
        yield
    finally:
        enable_progress_bars()


def _transport_errors() -> tuple[type[BaseException], ...]:
    """Connection and timeout errors of the HTTP clients huggingface_hub uses (httpx2 in 2.x, httpx in 1.x)."""
    errors: list[type[BaseException]] = [ConnectionError, TimeoutError]
    for client in ("httpx2", "httpx"):
        with contextlib.suppress(ImportError, AttributeError):
            errors.append(__import__(client).TransportError)
    return tuple(errors)


def _unreachable(label: str, endpoint: str, error: BaseException | None, cache: str) -> str:
    kind = f" ({type(error).__name__})" if error is not None else ""
    return (
        f"{label}: could not reach {endpoint}{kind} and it is not in the Hugging Face cache ({cache}): check the "
        "network, set HF_ENDPOINT to a mirror, or download it elsewhere into the cache and set HF_HUB_OFFLINE=1"
    )


def _http_status(error: BaseException) -> str:
    response = getattr(error, "response", None)
    status = getattr(response, "status_code", None)
    return f"HTTP {status}" if status is not None else type(error).__name__


# ---- ModelScope -----------------------------------------------------------------------------------------------------
def _from_modelscope(label: str, repo: str, revision: str | None) -> str:
    try:
        from modelscope import snapshot_download
    except ImportError:
        raise ModelNotFoundError(
            f"{label}: ModelScope downloads need the modelscope package; install the extra: "
            "pip install 'glm4v-edge[modelscope]'"
        ) from None
    import inspect

    params = inspect.signature(snapshot_download).parameters
    patterns = "allow_patterns" if "allow_patterns" in params else "allow_file_pattern"
    kwargs = {"revision": revision, patterns: list(ALLOW_PATTERNS)}
    cache = _tilde(os.environ.get("MODELSCOPE_CACHE") or Path.home() / ".cache" / "modelscope")
    fetch = f"modelscope download {repo}" + (f" --revision {revision}" if revision else "")
    offline = _truthy(os.environ.get("HF_HUB_OFFLINE"))
    try:
        if offline:
            return str(snapshot_download(repo, local_files_only=True, **kwargs))
        try:
            return str(snapshot_download(repo, **kwargs))
        except _modelscope_network_errors() as e:  # it does not fall back to its cache by itself: do it here
            log.debug("ModelScope unreachable for %s", repo, exc_info=True)
            try:
                path = str(snapshot_download(repo, local_files_only=True, **kwargs))
            except Exception:
                message = (
                    f"{label}: could not reach ModelScope ({type(e).__name__}) and it is not in the ModelScope cache "
                    f"({cache}): check the network or MODELSCOPE_ENDPOINT, or download it first ({fetch}) and set "
                    "HF_HUB_OFFLINE=1"
                )
                raise ModelNotFoundError(_one_line(message)) from None
            log.warning("ModelScope could not be reached (%s): using the cached %s", type(e).__name__, path)
            return path
    except ModelNotFoundError:
        raise
    except Exception as e:  # modelscope's error classes differ between releases: sort them by name and cause
        names = {type(x).__name__ for x in (e, e.__cause__) if x is not None}
        if offline and names & {"CacheNotFound", "ValueError", "FileNotFoundError"}:
            message = (
                f"{label}: not in the ModelScope cache ({cache}) and HF_HUB_OFFLINE is set (it keeps ModelScope "
                f"offline too): download it first ({fetch}) or unset HF_HUB_OFFLINE"
            )
        elif "NotExistError" in names:
            message = f"{label}: no such model on ModelScope (check the name and revision)"
        elif names & {"AuthenticationError", "PermissionDeniedError"}:
            message = f"{label}: ModelScope refused access (private or gated model: set MODELSCOPE_API_TOKEN)"
        else:
            message = f"{label}: ModelScope download failed: {type(e).__name__}: {e}"
        log.debug("modelscope snapshot_download(%r, revision=%r) failed", repo, revision, exc_info=True)
        raise ModelNotFoundError(_one_line(message)) from None


def _modelscope_network_errors() -> tuple[type[BaseException], ...]:
    """modelscope_hub's NetworkError (a ConnectionError) and the errors of requests, the client it is built on."""
    import requests

    return (ConnectionError, TimeoutError, requests.ConnectionError, requests.Timeout)


# ---- helpers --------------------------------------------------------------------------------------------------------
def _looks_like_path(model: str) -> bool:
    if model.startswith(("/", "./", "../", "~")) or model.endswith(("/", os.sep)):
        return True
    head = model.split("@", 1)[0]  # a revision may hold slashes (refs/pr/1)
    return head.count("/") + (head.count(os.sep) if os.sep != "/" else 0) >= 2


def _truthy(value: str | None) -> bool:
    return (value or "").strip().lower() in _TRUTHY


def _tilde(path: str | os.PathLike) -> str:
    path, home = str(path), str(Path.home())
    return "~" + path[len(home) :] if home != "/" and (path == home or path.startswith(home + os.sep)) else path


def _one_line(text: str) -> str:
    return " ".join(text.split())
