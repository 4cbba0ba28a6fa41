"""RL routes on ``vllm serve`` in RL mode, behind a bearer token (API-server process).

vLLM mounts its RL routes only with ``VLLM_SERVER_DEV_MODE=1``, which also
opens ``/collective_rpc`` and friends, and its ``--api-key`` guards only
``/v1``-style paths. In RL mode this endpoint plugin (vLLM's
``vllm.endpoint_plugins`` contract) serves the routes an RL client needs --
``/pause``, ``/resume``, ``/is_paused``, ``/init_weight_transfer_engine``,
``/start_weight_update``, ``/update_weights``, ``/finish_weight_update``,
``/shutdown_weight_transfer_engine``, ``/update_weight_version``,
``/weight_info``, and ours, ``/abort_weight_update`` -- without the rest of
dev mode (and in dev mode replaces vLLM's open copies of them).

Token: ``VLLM_RL_COMPAT_CONTROL_TOKEN`` only (a control-plane secret apart
from the users' key: ``--api-key`` / ``VLLM_API_KEY`` is never taken for it);
without it the routes are not mounted and start-up says so and how. A request
without ``Authorization: Bearer <token>`` gets 401 and changes nothing. The
comparison is constant-time on digests; the token is never logged.

Errors are JSON ``{"error": ...}``: 400 for a rejected update (what state the
model is in is in the message), 409 for a call out of order -- including
``/pause``, ``/resume`` and ``/update_weight_version`` while an update is open
(the update is named) --, 500 otherwise.

``/start_weight_update`` answers the update's id (``update_id``); a client
that sends it back with ``/update_weights``, ``/finish_weight_update`` and
``/abort_weight_update`` is refused (409, nothing done) when that update is
no longer the open one: a request delivered after its client timed out,
aborted and started again cannot land in the next update. vLLM's own client
sends no id and gets the open update, as before.
"""

# No ``from __future__ import annotations``: FastAPI reads the route
# handlers' annotations at runtime (``Request``, ``Body``), imported locally.
import hashlib
import hmac
import logging
import os
from typing import Any, Awaitable, Callable

logger = logging.getLogger("vllm.rl_compat")

TOKEN_ENV = "VLLM_RL_COMPAT_CONTROL_TOKEN"
NAME = "rl_compat"
# vLLM's handlers we serve as they are (they only read or pause).
_VLLM_HANDLERS = {"/pause": ("pause_generation", "POST"),
                  "/resume": ("resume_generation", "POST"),
                  "/is_paused": ("is_paused", "GET"),
                  "/update_weight_version": ("update_weight_version", "POST"),
                  "/weight_info": ("weight_info", "GET")}
_REFUSED_WHILE_OPEN = ("/pause", "/resume", "/update_weight_version")  # 409 mid-update


def control_token(args: Any) -> str | None:
    """The control token this server accepts, or ``None`` (routes not mounted).

    Only ``VLLM_RL_COMPAT_CONTROL_TOKEN``: the server's ``--api-key`` is what
    inference users hold, and whoever holds the control token can replace the
    weights."""
    return os.environ.get(TOKEN_ENV) or None


def _has_inference_key(args: Any) -> bool:
    return bool(getattr(args, "api_key", None) or os.environ.get("VLLM_API_KEY"))


def _rl_mode_with_weight_sync(args: Any) -> bool:
    import json

    from vllm_rl_compat import envs
    from vllm_rl_compat.config import rl_config_from_additional

    if not envs.VLLM_RL_COMPAT:
        return False
    extra = getattr(args, "additional_config", None)
    if isinstance(extra, str):
        extra = json.loads(extra)
    return rl_config_from_additional(extra).weight_sync


class RLCompatEndpoints:
    """An endpoint plugin (vLLM's ``EndpointPlugin`` contract), added by ``install``.

    Not an entry point: vLLM warns about every discovered endpoint plugin when
    ``VLLM_PLUGINS`` is unset, which would change stock ``vllm serve`` output
    for users with RL mode off.
    """

    name = NAME
    required_tasks = ("generate",)

    def attach_router(self, app: Any) -> None:
        args = app.state.args
        if not _rl_mode_with_weight_sync(args):
            return
        token = control_token(args)
        if token is None:
            why = (" (--api-key / VLLM_API_KEY is the inference users' key, not a control "
                   "key)" if _has_inference_key(args) else "")
            logger.warning("RL mode: the weight-update routes are NOT mounted%s: set %s to "
                           "a secret of its own to serve them behind a bearer token", why,
                           TOKEN_ENV)
            return
        app.include_router(_router(hashlib.sha256(token.encode()).digest()))
        logger.info("RL mode: weight-update routes mounted (bearer token required)")

    async def init_state(self, engine_client: Any, state: Any, args: Any) -> None:
        return None


def _router(token_digest: bytes) -> Any:
    from fastapi import APIRouter, Depends, HTTPException, Request
    from vllm.entrypoints.rl.online import api_router as vllm_rl

    def check_token(request: Request) -> None:
        scheme, _, value = request.headers.get("Authorization", "").partition(" ")
        given = hashlib.sha256(value.encode()).digest()
        if scheme.lower() != "bearer" or not hmac.compare_digest(given, token_digest):
            raise HTTPException(status_code=401, detail="Unauthorized")

    router = APIRouter(dependencies=[Depends(check_token)])
    for path, (handler, method) in _VLLM_HANDLERS.items():
        endpoint = getattr(vllm_rl, handler)
        if path in _REFUSED_WHILE_OPEN:
            endpoint = _conflict_is_409(endpoint)
        router.add_api_route(path, endpoint, methods=[method])
    for path, endpoint in _transaction_routes().items():
        router.add_api_route(path, endpoint, methods=["POST"])
    return router


def _conflict_is_409(handler: Callable[..., Awaitable[Any]]) -> Callable[..., Awaitable[Any]]:
    """vLLM's handler, answering 409 (naming the open update) when the engine
    refuses it because a weight update is open (``native._guard``). Checked
    before the handler too: vLLM's pause and resume handlers turn every error
    into a 500."""
    import functools

    from fastapi.responses import JSONResponse

    from vllm_rl_compat.weights.frontend.native import transaction_of
    from vllm_rl_compat.weights.frontend.transaction import TransactionStateError

    @functools.wraps(handler)  # FastAPI reads the handler's own signature
    async def route(*args: Any, **kwargs: Any) -> Any:
        try:
            engine = kwargs["raw_request"].app.state.engine_client
            txn = transaction_of(engine, engine.vllm_config)
            if txn is not None:
                txn.require_closed(handler.__name__)
            return await handler(*args, **kwargs)
        except TransactionStateError as exc:
            return JSONResponse({"error": str(exc)}, status_code=409)
    return route


def _transaction_routes() -> dict[str, Callable[..., Awaitable[Any]]]:
    from typing import Annotated

    from fastapi import Body, Request
    from vllm.distributed.weight_transfer.base import (
        WeightTransferInitRequest,
        WeightTransferUpdatePayload,
        WeightTransferUpdateRequest,
    )

    from vllm_rl_compat.weights.frontend.native import abort_weight_update_async

    def client(request: Request) -> Any:
        return request.app.state.engine_client

    async def init(request: Request, init_info: Annotated[dict[str, Any], Body(embed=True)]):
        return await _answer(client(request).init_weight_transfer_engine(
            WeightTransferInitRequest(init_info=init_info)), "Weight transfer initialized")

    async def start(request: Request):
        return await _answer(client(request).start_weight_update(), "Weight update started",
                             key="update_id")

    async def update(request: Request,
                     update_info: Annotated[WeightTransferUpdatePayload, Body(embed=True)],
                     update_id: Annotated[str | None, Body(embed=True)] = None):
        return await _answer(client(request).update_weights(
            WeightTransferUpdateRequest(update_info=update_info), update_id=update_id),
            "Weights updated")

    async def finish(request: Request,
                     weight_version: Annotated[str | None, Body(embed=True)] = None,
                     update_id: Annotated[str | None, Body(embed=True)] = None):
        return await _answer(client(request).finish_weight_update(
            weight_version, update_id=update_id), "Weight update finished")

    async def shutdown(request: Request):
        return await _answer(client(request).shutdown_weight_transfer_engine(),
                             "Weight transfer shut down")

    async def abort(request: Request,
                    update_id: Annotated[str | None, Body(embed=True)] = None):
        from vllm_rl_compat.weights.protocol.registry import is_ours

        transfer = getattr(client(request).vllm_config, "weight_transfer_config", None)
        staged = is_ours(getattr(transfer, "backend", None))
        return await _answer(abort_weight_update_async(client(request), update_id),
                             lambda dropped: _aborted(dropped, staged, update_id))

    return {"/init_weight_transfer_engine": init, "/start_weight_update": start,
            "/update_weights": update, "/finish_weight_update": finish,
            "/shutdown_weight_transfer_engine": shutdown, "/abort_weight_update": abort}


def _aborted(dropped: str | None, staged: bool, update_id: str | None = None) -> str:
    if dropped is None:
        return ("No weight update was open" if update_id is None else
                f"Weight update {update_id[:8]} is not open; nothing dropped")
    state = ("model unchanged" if staged else "the weight backend streams into the live "
             "weights: the model may hold part of it")
    return f"Weight update {dropped[:8]} aborted; {state}"


async def _answer(call: Awaitable[Any], message: str | Callable[[Any], str],
                  key: str | None = None) -> Any:
    """Run one engine call; JSON 200 (``key``: the call's result under that
    name too), or the error with its status."""
    from fastapi.responses import JSONResponse

    from vllm_rl_compat.weights.frontend.transaction import TransactionStateError
    from vllm_rl_compat.weights.protocol.spec import WeightUpdateError

    try:
        result = await call
    except TransactionStateError as exc:
        return JSONResponse({"error": str(exc)}, status_code=409)
    except WeightUpdateError as exc:
        return JSONResponse({"error": str(exc)}, status_code=400)
    except Exception as exc:  # noqa: BLE001 - reported to the caller, logged here
        logger.exception("RL route failed")
        return JSONResponse({"error": f"{type(exc).__name__}: {exc}"}, status_code=500)
    body = {"message": message(result) if callable(message) else message}
    return JSONResponse({**body, key: result} if key else body)


def install() -> None:
    """API-server process: add this endpoint plugin to vLLM's list in RL mode.

    RL mode (``VLLM_RL_COMPAT=1``) is the opt-in, and the routes need the token.
    """
    import vllm.plugins

    from vllm_rl_compat.patching import patch_method

    def wrap(original: Any) -> Any:
        def load_endpoint_plugins(*args: Any, **kwargs: Any) -> list[Any]:
            plugins = list(original(*args, **kwargs))
            if not any(getattr(p, "name", None) == NAME for p in plugins):
                plugins.append(RLCompatEndpoints())
            return plugins
        return load_endpoint_plugins

    patch_method(vllm.plugins, "load_endpoint_plugins", wrap)
