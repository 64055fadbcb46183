"""``tether saga create|claim|step|heartbeat|complete|fail|compensation``: a saga run by a
shell script (or by a program in any language that would rather run a command).

``claim`` claims a saga with a lease of its own and prints the claim as shell ``export``
lines; ``eval`` them and every later command finds the saga and the claim's fence in the
environment, as ``tether lease run`` gives its command ``TETHER_LEASE_ID`` and
``TETHER_FENCING_TOKEN``:

- ``TETHER_SAGA_ID``, ``TETHER_SAGA_KIND``, ``TETHER_NAMESPACE`` (the connection option's
  variable too, so later commands go to the saga's namespace);
- ``TETHER_LEASE_KEY``, ``TETHER_LEASE_ID``, ``TETHER_FENCING_TOKEN``: the claim's lease
  and fence;
- ``TETHER_SAGA_ATTEMPT``, ``TETHER_SAGA_STATE``;
- ``TETHER_SAGA_NEXT_STEP``: the first step index that has not succeeded (the steps before
  it succeeded in earlier attempts and are not run again); ``TETHER_SAGA_STEPS``,
  ``TETHER_SAGA_COMPENSATIONS`` and ``TETHER_SAGA_INPUT`` as JSON.

``step INDEX NAME --status started|succeeded|failed`` records a step; ``step INDEX NAME --
COMMAND`` runs COMMAND as the step: started, then succeeded with what it printed as the
step's output (JSON, or else the text), or failed with its exit status; the claim's lease is
kept alive while it runs (heartbeats every third of the ttl), and a lost claim stops the
command (SIGTERM, SIGKILL after ``--grace``) and exits 75. Either way, a step that already
succeeded (in this or an earlier attempt) is not recorded or run again: ``step`` prints its
recorded output, so ``out=$(tether saga step 0 build -- ./build.sh)`` is the same on every
attempt.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import shlex
import signal
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from tether_client import cli_format as fmt
from tether_client.cli_args import (
    Parser,
    duration,
    int32,
    json_object,
    json_value,
    label,
    non_negative_int,
    positive_duration,
    time_or_duration,
)
from tether_client.cli_common import (
    EXIT_LOST,
    Call,
    Check,
    SubParsers,
    UsageError,
    cli_holder,
    command,
    emit,
    say,
)
from tether_client.cli_env import child_environment
from tether_client.cli_run import (
    EXIT_CANNOT_EXECUTE,
    EXIT_NOT_FOUND,
    _terminal_sent_sigint,
    exit_status,
)
from tether_client.cli_saga import print_saga, saga_details, state
from tether_client.client import TetherClient
from tether_client.convert import parse_int
from tether_client.errors import (
    InvalidSagaState,
    LeaseEnded,
    NotLeaseHolder,
    SagaTerminal,
    StaleFencingToken,
    StepConflict,
    TetherError,
    Unavailable,
)
from tether_client.pb import common_pb2, saga_pb2
from tether_client.results import Claim
from tether_client.values import from_struct, from_value, to_value

ENV_SAGA_ID = "TETHER_SAGA_ID"
ENV_LEASE_ID = "TETHER_LEASE_ID"
ENV_FENCING_TOKEN = "TETHER_FENCING_TOKEN"
STEP_STATUSES = ("started", "succeeded", "failed")
COMPENSATION_STATUSES = ("succeeded", "failed")
ON_STALE = ("requeue", "compensate", "quarantine")
PURPOSES = ("execute", "compensate")
FORWARDED_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
# `--output` not given (JSON null is a value: `--output null`).
NOT_GIVEN: Any = object()
# Refusals that mean the claim is gone: whatever runs under it is no longer protected.
CLAIM_GONE = (LeaseEnded, StaleFencingToken, SagaTerminal, NotLeaseHolder, InvalidSagaState)


# --- text ---------------------------------------------------------------------------------


def output_text(value: Any) -> str:
    """A step's output as a script reads it: a string as itself, anything else as JSON."""
    if isinstance(value, str):
        return value
    return json.dumps(value, ensure_ascii=False)


def _compact(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"))


def _step_status(step: saga_pb2.SagaStep) -> str:
    return saga_pb2.StepStatus.Name(step.status).removeprefix("STEP_STATUS_").lower()


def next_step(saga: saga_pb2.Saga) -> int:
    """The first step index that has not succeeded (steps succeed in order)."""
    done = {step.index for step in saga.steps if step.status == saga_pb2.STEP_STATUS_SUCCEEDED}
    index = 0
    while index in done:
        index += 1
    return index


def claim_environment(claim: Claim) -> dict[str, str]:
    """The variables ``claim`` prints as ``export`` lines."""
    saga = claim.saga
    steps = [
        {
            "index": step.index,
            "name": step.name,
            "status": _step_status(step),
            "attempt": step.attempt,
            "output": from_value(step.output) if step.HasField("output") else None,
            "error": step.error,
            "compensation": step.compensation.name,
        }
        for step in saga.steps
    ]
    payloads = {step.index: step.compensation.payload for step in saga.steps}
    compensations = [
        {
            "step_index": record.step_index,
            "name": record.name,
            "status": saga_pb2.CompensationStatus.Name(record.status)
            .removeprefix("COMPENSATION_STATUS_")
            .lower(),
            "attempts": record.attempts,
            "payload": from_value(payloads[record.step_index])
            if record.step_index in payloads
            else None,
        }
        for record in saga.compensations
    ]
    return {
        ENV_SAGA_ID: saga.saga_id,
        "TETHER_SAGA_KIND": saga.kind,
        "TETHER_NAMESPACE": saga.namespace,
        "TETHER_LEASE_KEY": claim.lease.key,
        ENV_LEASE_ID: claim.fence.lease_id,
        ENV_FENCING_TOKEN: str(claim.fence.fencing_token),
        "TETHER_SAGA_ATTEMPT": str(saga.attempt),
        "TETHER_SAGA_STATE": state(saga.state),
        "TETHER_SAGA_NEXT_STEP": str(next_step(saga)),
        "TETHER_SAGA_INPUT": _compact(from_struct(saga.input)),
        "TETHER_SAGA_STEPS": _compact(steps),
        "TETHER_SAGA_COMPENSATIONS": _compact(compensations),
    }


def exports(variables: dict[str, str]) -> str:
    return "\n".join(f"export {name}={shlex.quote(value)}" for name, value in variables.items())


# --- the claim in the environment -----------------------------------------------------------


def _fence(args: argparse.Namespace) -> tuple[str, common_pb2.Fence]:
    """The saga and the claim's fence: the flags, or else the variables ``claim`` set."""
    saga_id = args.saga or os.environ.get(ENV_SAGA_ID, "")
    lease_id = args.lease_id or os.environ.get(ENV_LEASE_ID, "")
    token = args.fencing_token
    if token is None and os.environ.get(ENV_FENCING_TOKEN):
        text = os.environ[ENV_FENCING_TOKEN]
        try:
            token = parse_int(text, minimum=1)
        except ValueError:
            raise UsageError(f"{ENV_FENCING_TOKEN} is not a fencing token: {text!r}") from None
    missing = [
        f"{flag} ({variable})"
        for flag, variable, value in (
            ("--saga", ENV_SAGA_ID, saga_id),
            ("--lease-id", ENV_LEASE_ID, lease_id),
            ("--fencing-token", ENV_FENCING_TOKEN, token),
        )
        if not value
    ]
    if missing:
        raise UsageError(
            f"no claim to act for: no {', '.join(missing)}; claim the saga first "
            '(claim=$(tether saga claim ...) && eval "$claim")'
        )
    assert token is not None
    return saga_id, common_pb2.Fence(lease_id=lease_id, fencing_token=token)


def _compensation(args: argparse.Namespace) -> saga_pb2.Compensation | None:
    if args.compensation is None:
        if args.payload is not NOT_GIVEN or args.compensation_attempts:
            raise UsageError("--payload and --compensation-attempts go with --compensation NAME")
        return None
    compensation = saga_pb2.Compensation(
        name=args.compensation, max_attempts=args.compensation_attempts
    )
    if args.payload is not NOT_GIVEN:
        compensation.payload.CopyFrom(_value(args.payload, "--payload"))
    return compensation


def _value(value: Any, flag: str) -> Any:
    try:
        return to_value(value)
    except (TypeError, ValueError) as exc:
        raise UsageError(f"{flag}: {exc}") from None


async def _succeeded(
    client: TetherClient, saga_id: str, index: int, name: str
) -> saga_pb2.SagaStep | None:
    """Step ``index`` if it already succeeded under ``name`` (it is not run again)."""
    saga = await client.sagas.get(saga_id)
    for step in saga.steps:
        if step.index == index and step.name == name:
            return step if step.status == saga_pb2.STEP_STATUS_SUCCEEDED else None
    return None


def _print_done(step: saga_pb2.SagaStep, args: argparse.Namespace) -> None:
    say(
        f"step {step.index} ({step.name}) succeeded in attempt {step.attempt}; "
        "not run again (its recorded output follows)"
    )
    _print_step(step, args)


def _print_step(step: saga_pb2.SagaStep, args: argparse.Namespace) -> None:
    if args.json:
        emit(fmt.json_block(fmt.to_json(step)))
    elif step.HasField("output") and step.status == saga_pb2.STEP_STATUS_SUCCEEDED:
        emit(output_text(from_value(step.output)))


# --- commands -----------------------------------------------------------------------------


async def _create(client: TetherClient, args: argparse.Namespace) -> int:
    created = await client.sagas.create(
        args.saga_id,
        args.kind,
        input=args.input,
        labels=dict(args.labels),
        on_stale=args.on_stale,
        max_attempts=args.max_attempts,
        deadline=args.deadline,
    )
    if args.json:
        response = saga_pb2.CreateSagaResponse(saga=created.saga, created=created.created)
        emit(fmt.json_block(fmt.to_json(response)))
    else:
        note = "yes" if created.created else "no (a saga with this id and body existed)"
        emit(f"{saga_details(created.saga)}\n\ncreated: {note}")
    return 0


async def _announce_claimed(client: TetherClient, saga_id: str, wait: float) -> None:
    """Say once who has the saga claimed, while a claim waits up to ``wait`` for it."""
    try:
        saga = await client.sagas.get(saga_id)
    except TetherError:
        return
    waiting = f"waiting up to {fmt.duration(wait)}"
    if saga.holder and saga.claim.lease_id:
        until = ""
        with contextlib.suppress(TetherError):
            lease = await client.leases.get(lease_id=saga.claim.lease_id)
            until = f" until {fmt.timestamp(lease.expires_at)} (unless renewed)"
        say(f"saga {saga_id} is claimed by {saga.holder}{until}; {waiting}")
    elif saga.HasField("not_before"):
        say(f"saga {saga_id} is not claimable before {fmt.timestamp(saga.not_before)}; {waiting}")


def _check_claim(args: argparse.Namespace) -> None:
    if bool(args.saga_id) == bool(args.kind):
        raise UsageError("give SAGA_ID or --kind KIND (the oldest claimable saga of the kind)")


async def _claim(client: TetherClient, args: argparse.Namespace) -> int:
    holder = args.holder or cli_holder()
    claiming = asyncio.ensure_future(
        client.sagas.claim(
            args.saga_id or None,
            kind=args.kind,
            purpose=args.purpose,
            ttl=args.ttl,
            holder=holder,
            labels=dict(args.labels),
            wait=args.wait,
        )
    )
    notice = None
    if args.wait > 0 and args.saga_id:
        notice = asyncio.create_task(_announce_claimed(client, args.saga_id, args.wait))
    try:
        claim = await claiming
    finally:
        if notice is not None:
            notice.cancel()
            await asyncio.gather(notice, return_exceptions=True)
    if args.json:
        response = saga_pb2.ClaimSagaResponse(saga=claim.saga, lease=claim.lease, fence=claim.fence)
        emit(fmt.json_block(fmt.to_json(response)))
    else:
        emit(exports(claim_environment(claim)))
    return 0


def _check_claimed(args: argparse.Namespace) -> None:
    """The saga and fence a command acts under, as ``args.claimed``."""
    args.claimed = _fence(args)


def _check_step(args: argparse.Namespace) -> None:
    _check_claimed(args)
    args.compensation_spec = _compensation(args)
    if args.argv:
        if args.status is not None or args.output is not NOT_GIVEN or args.error:
            raise UsageError("-- COMMAND records the step itself: no --status, --output, --error")
    elif args.status is None:
        raise UsageError("give --status STATUS, or -- COMMAND to run as the step")
    if args.output is not NOT_GIVEN:
        _value(args.output, "--output")


def _check_fail(args: argparse.Namespace) -> None:
    _check_claimed(args)
    if args.retry_after and not args.retryable:
        raise UsageError("--retry-after goes with --retryable")


async def _step(client: TetherClient, args: argparse.Namespace) -> int:
    saga_id, fence = args.claimed
    compensation = args.compensation_spec
    if args.argv:
        runner = StepRunner(saga_id, fence, args, compensation)
        return await runner.run(client)
    extra: dict[str, Any] = {}
    if args.output is not NOT_GIVEN:
        extra["output"] = args.output
    try:
        recorded = await client.sagas.record_step(
            saga_id,
            fence,
            args.index,
            args.name,
            args.status,
            error=args.error,
            compensation=compensation,
            **extra,
        )
    except StepConflict:
        done = await _succeeded(client, saga_id, args.index, args.name)
        if done is None:
            raise
        _print_done(done, args)
        return 0
    if args.json:
        response = saga_pb2.RecordStepResponse(
            step=recorded.step, state=recorded.state, revision=recorded.revision
        )
        emit(fmt.json_block(fmt.to_json(response)))
    else:
        _print_step(recorded.step, args)
    return 0


async def _heartbeat(client: TetherClient, args: argparse.Namespace) -> int:
    saga_id, fence = args.claimed
    beat = await client.sagas.heartbeat(saga_id, fence, progress=args.progress.encode())
    if args.json:
        response = saga_pb2.HeartbeatSagaResponse(state=beat.state)
        response.expires_at.FromDatetime(beat.expires_at)
        response.ttl.FromTimedelta(beat.ttl)
        emit(fmt.json_block(fmt.to_json(response)))
    else:
        expires = beat.expires_at.strftime("%Y-%m-%dT%H:%M:%SZ")
        pairs = [
            ("state", state(beat.state)),
            ("ttl", fmt.duration(beat.ttl.total_seconds())),
            ("expires_at", expires),
        ]
        emit(fmt.fields(pairs))
    return 0


async def _complete(client: TetherClient, args: argparse.Namespace) -> int:
    saga_id, fence = args.claimed
    print_saga(await client.sagas.complete(saga_id, fence, output=args.output), args)
    return 0


async def _fail(client: TetherClient, args: argparse.Namespace) -> int:
    saga_id, fence = args.claimed
    saga = await client.sagas.fail(
        saga_id,
        fence,
        reason=args.reason,
        retryable=args.retryable,
        retry_after=args.retry_after,
        hand_off=args.hand_off,
    )
    print_saga(saga, args)
    return 0


async def _compensation_done(client: TetherClient, args: argparse.Namespace) -> int:
    saga_id, fence = args.claimed
    recorded = await client.sagas.record_compensation(
        saga_id, fence, args.step_index, args.status, error=args.error, attempt=args.attempt
    )
    if args.json:
        response = saga_pb2.RecordCompensationResponse(
            compensation=recorded.compensation, state=recorded.state, revision=recorded.revision
        )
        emit(fmt.json_block(fmt.to_json(response)))
    else:
        record = recorded.compensation
        status = saga_pb2.CompensationStatus.Name(record.status)
        pairs = [
            ("step_index", str(record.step_index)),
            ("name", record.name),
            ("status", status.removeprefix("COMPENSATION_STATUS_").lower()),
            ("attempts", f"{record.attempts}/{record.max_attempts}"),
            ("saga_state", state(recorded.state)),
        ]
        emit(fmt.fields(pairs))
    return 0


# --- step -- COMMAND ------------------------------------------------------------------------


def _parse_output(data: bytes) -> Any:
    """What a step command printed, as its output: JSON when it is JSON, else the text
    (one trailing newline dropped); ``NOT_GIVEN`` when it printed nothing."""
    text = data.decode("utf-8", errors="replace")
    text = text[:-1] if text.endswith("\n") else text
    if not text.strip():
        return NOT_GIVEN
    try:
        value = json.loads(text)
        to_value(value)
    except (TypeError, ValueError):
        return text
    return value


@dataclass
class _Lost:
    error: TetherError


class StepRunner:
    """One ``step INDEX NAME -- COMMAND``: the step's records, the command, the claim's
    heartbeats and the signals between them."""

    def __init__(
        self,
        saga_id: str,
        fence: common_pb2.Fence,
        args: argparse.Namespace,
        compensation: saga_pb2.Compensation | None,
    ) -> None:
        self.saga_id = saga_id
        self.fence = fence
        self.args = args
        self.compensation = compensation
        self.argv: Sequence[str] = args.argv
        self.proc: asyncio.subprocess.Process | None = None
        self.lost: _Lost | None = None
        self.error = ""
        self._kill_timer: asyncio.TimerHandle | None = None

    async def run(self, client: TetherClient) -> int:
        args = self.args
        try:
            await client.sagas.record_step(
                self.saga_id,
                self.fence,
                args.index,
                args.name,
                "started",
                compensation=self.compensation,
            )
        except StepConflict:
            done = await _succeeded(client, self.saga_id, args.index, args.name)
            if done is None:
                raise
            _print_done(done, args)
            return 0
        beat = await client.sagas.heartbeat(self.saga_id, self.fence)
        interval = max(beat.ttl.total_seconds() / 3, 0.2)
        loop = asyncio.get_running_loop()
        for signum in FORWARDED_SIGNALS:
            loop.add_signal_handler(signum, self._on_signal, signum)
        keeping = asyncio.create_task(self._keep_alive(client, interval, beat.ttl.total_seconds()))
        try:
            status, output = await self._run_command()
        finally:
            keeping.cancel()
            await asyncio.gather(keeping, return_exceptions=True)
            if self._kill_timer is not None:
                self._kill_timer.cancel()
            for signum in FORWARDED_SIGNALS:
                loop.remove_signal_handler(signum)
        if self.lost is not None:
            say(f"the claim was lost while the command ran (it exited {status})")
            return EXIT_LOST
        try:
            return await self._record_end(client, status, output)
        except CLAIM_GONE as exc:
            say(f"the claim was lost while the command ran (it exited {status}): {exc}")
            return EXIT_LOST

    async def _record_end(self, client: TetherClient, status: int, output: bytes) -> int:
        args = self.args
        if status != 0:
            if output:
                os.write(1, output)  # what it printed is not an output, but not to be lost
            error = self.error or f"{self.argv[0]} exited with status {status}"
            await client.sagas.record_step(
                self.saga_id, self.fence, args.index, args.name, "failed", error=error
            )
            return status
        value = _parse_output(output)
        extra: dict[str, Any] = {} if value is NOT_GIVEN else {"output": value}
        recorded = await client.sagas.record_step(
            self.saga_id, self.fence, args.index, args.name, "succeeded", **extra
        )
        _print_step(recorded.step, args)
        return 0

    async def _run_command(self) -> tuple[int, bytes]:
        env = child_environment(
            {
                "TETHER_SAGA_STEP_INDEX": str(self.args.index),
                "TETHER_SAGA_STEP_NAME": self.args.name,
            }
        )
        command = self.argv[0]
        try:
            self.proc = await asyncio.create_subprocess_exec(
                *self.argv, env=env, stdout=asyncio.subprocess.PIPE
            )
        except FileNotFoundError:
            self.error = f"{command}: command not found"
            say(self.error)
            return EXIT_NOT_FOUND, b""
        except OSError as exc:
            self.error = f"{command}: cannot run: {exc.strerror or exc}"
            say(self.error)
            return EXIT_CANNOT_EXECUTE, b""
        output, _ = await self.proc.communicate()
        return exit_status(self.proc.returncode or 0), output

    async def _keep_alive(self, client: TetherClient, interval: float, ttl: float) -> None:
        """Heartbeat the claim every ``interval``; stop the command once it is lost.

        Lost means: no heartbeat acknowledged before the safety deadline, the send time of
        the last acknowledged one plus its ttl minus a margin (a tenth, as ``hold()``
        keeps), so the command is stopped before the server can hand the saga on."""
        loop = asyncio.get_running_loop()
        margin = max(0.05, ttl / 10)
        deadline = loop.time() + ttl - margin
        while True:
            await asyncio.sleep(min(interval, max(deadline - loop.time(), 0)))
            sent = loop.time()
            if sent >= deadline:
                self._on_lost(Unavailable("no heartbeat acknowledged before the claim's deadline"))
                return
            try:
                beat = await client.sagas.heartbeat(
                    self.saga_id, self.fence, timeout=max(deadline - sent, 0.1)
                )
            except Unavailable as exc:
                if loop.time() < deadline:
                    continue
                self._on_lost(exc)
                return
            except TetherError as exc:
                self._on_lost(exc)
                return
            granted = beat.ttl.total_seconds()
            deadline = sent + granted - max(0.05, granted / 10)

    def _on_lost(self, error: TetherError) -> None:
        self.lost = _Lost(error)
        proc = self.proc
        if proc is None or proc.returncode is not None:
            say(f"claim lost: {error}")
            return
        grace = fmt.duration(self.args.grace)
        say(
            f"claim lost: {error}; stopping the command: SIGTERM to pid {proc.pid}, "
            f"SIGKILL after {grace}"
        )
        self._send(signal.SIGTERM)
        loop = asyncio.get_running_loop()
        self._kill_timer = loop.call_later(self.args.grace, self._send, signal.SIGKILL)

    def _send(self, signum: int) -> None:
        proc = self.proc
        if proc is not None and proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signum)

    def _on_signal(self, signum: int) -> None:
        if signum == signal.SIGINT and _terminal_sent_sigint():
            return  # the command, in our process group, has it already
        self._send(signum)


# --- the parser ---------------------------------------------------------------------------

CLAIM_HELP = """\
Claim a saga with a new lease (ttl --ttl, key sagas/SAGA_ID) and print the claim as shell
`export` lines, for `eval`: TETHER_SAGA_ID, TETHER_NAMESPACE, TETHER_LEASE_KEY,
TETHER_LEASE_ID, TETHER_FENCING_TOKEN, TETHER_SAGA_ATTEMPT, TETHER_SAGA_STATE,
TETHER_SAGA_KIND, TETHER_SAGA_NEXT_STEP (the first step not yet succeeded), and as JSON
TETHER_SAGA_INPUT, TETHER_SAGA_STEPS and TETHER_SAGA_COMPENSATIONS. With --json, the
ClaimSaga answer instead.

  claim=$(tether saga claim deploy-42 --ttl 10m) || exit; eval "$claim"

(`eval "$(tether saga claim ...)"` would lose claim's exit status.)
"""

STEP_HELP = """\
Record step INDEX (NAME) of the claimed saga, or run COMMAND as that step.

--status started|succeeded|failed records it (--output: the step's JSON output;
--error: why it failed). With -- COMMAND, the step is recorded started, COMMAND runs (its
stdout is captured: JSON, or else the text, becomes the step's output and is printed
once recorded), then the step is recorded succeeded, or failed with COMMAND's exit status,
which `step` exits with. While COMMAND runs the claim is heartbeated; if it is lost, the
command gets SIGTERM (SIGKILL after --grace) and `step` exits 75.

A step that already succeeded, in this attempt or an earlier one, is not recorded or run
again: its recorded output is printed (a note goes to stderr), and `step` exits 0.
--compensation NAME (with --payload JSON) registers what undoes the step, before it runs.
The saga and the fence come from TETHER_SAGA_ID, TETHER_LEASE_ID and TETHER_FENCING_TOKEN
(set by `eval` of `tether saga claim`), or --saga, --lease-id, --fencing-token.
"""


def _add_fence_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--saga",
        default="",
        metavar="SAGA_ID",
        help=f"the claimed saga (default: ${ENV_SAGA_ID}, set by `eval` of claim)",
    )
    parser.add_argument(
        "--lease-id",
        default="",
        metavar="LEASE_ID",
        help=f"the claim's lease (default: ${ENV_LEASE_ID})",
    )
    parser.add_argument(
        "--fencing-token",
        type=non_negative_int,
        default=None,
        metavar="N",
        help=f"the claim's fencing token (default: ${ENV_FENCING_TOKEN})",
    )


def register_flow(sub: SubParsers, *, report_error: Any, epilog: str) -> None:
    """Add the commands that run a saga from a script to ``tether saga``."""

    def cmd(
        name: str,
        help: str,
        call: Call,
        *,
        description: str | None = None,
        check: Check | None = _check_claimed,
    ) -> argparse.ArgumentParser:
        return command(
            sub,
            name,
            help,
            call,
            report_error=report_error,
            epilog=epilog,
            description=description,
            check=check,
        )

    create = cmd(
        "create", "create a saga (a repeat with the same body is no error)", _create, check=None
    )
    create.add_argument("saga_id", metavar="SAGA_ID")
    create.add_argument("--kind", required=True, help="what the saga does, for claim --kind")
    create.add_argument(
        "--input",
        type=json_object,
        default=None,
        metavar="JSON",
        help="the saga's input, a JSON object (@FILE reads a file, @- stdin)",
    )
    create.add_argument(
        "--label",
        dest="labels",
        type=label,
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a label on the saga (repeatable)",
    )
    create.add_argument(
        "--on-stale",
        choices=ON_STALE,
        default=None,
        help="when a claim's lease ends before the saga does (the server's default: requeue)",
    )
    create.add_argument(
        "--max-attempts",
        type=int32("--max-attempts"),
        default=0,
        metavar="N",
        help="claims before a failing or stale saga stops being retried (default 3)",
    )
    create.add_argument(
        "--deadline",
        type=time_or_duration,
        default=None,
        metavar="TIME",
        help="past it a running saga compensates: an RFC 3339 time, or a duration from now",
    )

    claim = cmd(
        "claim",
        "claim a saga; print the claim as shell export lines",
        _claim,
        description=CLAIM_HELP,
        check=_check_claim,
    )
    claim.add_argument("saga_id", nargs="?", default="", metavar="SAGA_ID")
    claim.add_argument("--kind", default="", help="claim the oldest claimable saga of this kind")
    claim.add_argument(
        "--ttl",
        type=positive_duration,
        required=True,
        metavar="DURATION",
        help="the claim's lease: heartbeat (or run steps with -- COMMAND) within it",
    )
    claim.add_argument(
        "--wait",
        type=duration,
        default=0.0,
        metavar="DURATION",
        help="wait up to this long for a claimable saga (default: fail at once)",
    )
    claim.add_argument(
        "--purpose",
        choices=PURPOSES,
        default="execute",
        help="execute (default) runs the saga; compensate runs a failed one's compensations",
    )
    claim.add_argument(
        "--label",
        dest="labels",
        type=label,
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a label on the claim's lease (repeatable)",
    )

    step = cmd(
        "step",
        "record a step of the claimed saga, or run a command as one",
        _step,
        description=STEP_HELP,
        check=_check_step,
    )
    step.usage = (
        "%(prog)s [options] INDEX NAME (--status STATUS [--output JSON] [--error TEXT] "
        "| -- COMMAND [ARGS...])"
    )
    step.add_argument("index", type=int32("step index"), metavar="INDEX")
    step.add_argument("name", metavar="NAME")
    step.add_argument(
        "--status",
        choices=STEP_STATUSES,
        default=None,
        help="record the step so (instead of running a COMMAND as the step)",
    )
    step.add_argument(
        "--output",
        type=json_value,
        default=NOT_GIVEN,
        metavar="JSON",
        help="the step's output, any JSON value ('\"web:1\"', '{\"a\": 1}'; @FILE, @-)",
    )
    step.add_argument("--error", default="", metavar="TEXT", help="why the step failed")
    step.add_argument(
        "--compensation",
        default=None,
        metavar="NAME",
        help="the compensation that undoes this step (run if the saga fails later)",
    )
    step.add_argument(
        "--payload",
        type=json_value,
        default=NOT_GIVEN,
        metavar="JSON",
        help="what the compensation needs, any JSON value",
    )
    step.add_argument(
        "--compensation-attempts",
        type=int32("--compensation-attempts"),
        default=0,
        metavar="N",
        help="attempts of the compensation before the saga is quarantined (default 3)",
    )
    step.add_argument(
        "--grace",
        type=duration,
        default=10.0,
        metavar="DURATION",
        help="-- COMMAND: after a lost claim, SIGKILL it this long after SIGTERM (default 10s)",
    )
    # What follows `--` (argparse would give a "*" positional nothing, next to INDEX NAME).
    if isinstance(step, Parser):
        step.trailing_command = "argv"
    _add_fence_options(step)

    heartbeat = cmd("heartbeat", "renew the claim's lease (and store progress)", _heartbeat)
    heartbeat.add_argument(
        "--progress",
        default="",
        metavar="TEXT",
        help="progress details, read by the next attempt after a crash",
    )
    _add_fence_options(heartbeat)

    complete = cmd("complete", "complete the claimed saga", _complete)
    complete.add_argument(
        "--output",
        type=json_object,
        default=None,
        metavar="JSON",
        help="the saga's output, a JSON object (@FILE, @-)",
    )
    _add_fence_options(complete)

    fail = cmd(
        "fail", "fail the claimed saga: compensate it, or retry it later", _fail, check=_check_fail
    )
    fail.add_argument("--reason", required=True, metavar="TEXT", help="why, recorded on the saga")
    fail.add_argument(
        "--retryable",
        action="store_true",
        help="back to claimable while attempts are left, instead of compensating",
    )
    fail.add_argument(
        "--retry-after",
        type=duration,
        default=0.0,
        metavar="DURATION",
        help="with --retryable: not claimable before this long from now",
    )
    fail.add_argument(
        "--hand-off",
        action="store_true",
        help="leave the compensations to a compensation worker; the claim ends now "
        "(otherwise this claim runs them: tether saga compensation)",
    )
    _add_fence_options(fail)

    compensation = cmd(
        "compensation",
        "record a compensation's result (a claim that compensates)",
        _compensation_done,
    )
    compensation.add_argument("step_index", type=int32("step index"), metavar="STEP_INDEX")
    compensation.add_argument(
        "--status", choices=COMPENSATION_STATUSES, required=True, help="how the compensation went"
    )
    compensation.add_argument("--error", default="", metavar="TEXT", help="why it failed")
    compensation.add_argument(
        "--attempt",
        type=int32("--attempt"),
        default=0,
        metavar="N",
        help="the attempt being recorded (makes a repeat harmless; default: the next)",
    )
    _add_fence_options(compensation)
