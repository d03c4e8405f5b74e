"""What every command shares: exit statuses, the one error line, the connection options.

Every command runs inside :meth:`AgentBillGroup.main`, which turns whatever a command raises
into one line on stderr and an exit status: 2 for bad input (a usage error, or an
InvalidRequestError: nothing was written), 3 when Redis is unavailable (StoreUnavailableError,
within the client's timeouts and retries), 1 for anything else. typer's runner (the fast tests)
and the console script go through the same ``main``, so they answer alike.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Annotated, Any, NoReturn
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import redis
import typer
from typer.core import TyperGroup

from agentbill import _core
from agentbill._client import AgentBillClient, from_url
from agentbill._exceptions import AgentBillError, InvalidRequestError, StoreUnavailableError

ENV_REDIS_URL = "AGENTBILL_REDIS_URL"
ENV_NAMESPACE = "AGENTBILL_NAMESPACE"
ENV_API_KEY = "AGENTBILL_API_KEY"

EXIT_OK = 0
EXIT_ERROR = 1
EXIT_BAD_INPUT = 2
EXIT_UNAVAILABLE = 3
EXIT_INTERRUPTED = 130

EXIT_STATUS_TEXT = (
    f"Exit status: {EXIT_OK} done, {EXIT_BAD_INPUT} bad input (nothing written), "
    f"{EXIT_UNAVAILABLE} Redis unavailable, {EXIT_ERROR} other errors."
)


class Failed(Exception):
    """A command's own failure: ``message`` goes to stderr, ``exit_code`` is the status."""

    def __init__(self, message: str, exit_code: int = EXIT_ERROR) -> None:
        super().__init__(message)
        self.exit_code = exit_code


def error_line(message: str) -> None:
    """One line on stderr, whatever ``message`` holds."""
    text = " ".join(str(message).split())
    print(f"agentbill: error: {text}", file=sys.stderr)


def warning(message: str) -> None:
    """One warning line on stderr: the command goes on."""
    text = " ".join(str(message).split())
    print(f"agentbill: warning: {text}", file=sys.stderr, flush=True)


def exit_status(run: Callable[[], Any]) -> int:
    """Run a command; return its exit status, printing at most one error line."""
    try:
        returned = run()
    except typer.TyperException as exc:  # typer's usage errors (exit_code 2), and the like
        ctx = getattr(exc, "ctx", None)
        if type(exc).__name__ == "NoArgsIsHelpError":
            print(exc.format_message().rstrip("\n"))
            return exc.exit_code
        hint = f" (see `{ctx.command_path} --help`)" if ctx is not None else ""
        error_line(exc.format_message() + hint)
        return exc.exit_code
    except typer.Abort:
        error_line("interrupted")
        return EXIT_INTERRUPTED
    except Failed as exc:
        error_line(str(exc))
        return exc.exit_code
    except InvalidRequestError as exc:
        error_line(f"{exc} (nothing was written)")
        return EXIT_BAD_INPUT
    except StoreUnavailableError as exc:
        error_line(str(exc))
        return EXIT_UNAVAILABLE
    except AgentBillError as exc:
        error_line(str(exc))
        return EXIT_ERROR
    except BrokenPipeError:
        # The reader went away (`agentbill events ... | head`): stop quietly. stdout is
        # pointed at /dev/null so the interpreter's last flush does not complain either.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_OK
    except Exception as exc:  # never a traceback: the one line says what it was
        error_line(f"unexpected {type(exc).__name__}: {exc}")
        return EXIT_ERROR
    return returned if isinstance(returned, int) else EXIT_OK


class AgentBillGroup(TyperGroup):
    """The root group: runs every command through :func:`exit_status`."""

    def main(  # type: ignore[override]
        self,
        args: Sequence[str] | None = None,
        prog_name: str | None = None,
        complete_var: str | None = None,
        standalone_mode: bool = True,
        **extra: Any,
    ) -> Any:
        def invoke() -> Any:
            return super(AgentBillGroup, self).main(
                args=args,
                prog_name=prog_name or "agentbill",
                complete_var=complete_var,
                standalone_mode=False,
                **extra,
            )

        code = exit_status(invoke)
        if standalone_mode:
            sys.exit(code)
        return code


def example(*lines: str, exits: str = EXIT_STATUS_TEXT) -> str:
    """A command's epilog: its examples, one per line, and its exit statuses."""
    shown = "\n".join(f"    {line}" for line in lines)
    return f"**Example**\n\n{shown}\n\n{exits}"


def group(name: str, help: str, *examples: str) -> typer.Typer:
    """A command group whose help shows ``examples``; ``agentbill NAME`` alone shows it."""
    return typer.Typer(
        name=name,
        help=help,
        epilog=example(*examples),
        no_args_is_help=True,
        rich_markup_mode="markdown",
    )


# -- connection ----------------------------------------------------------------------------------

RedisUrl = Annotated[
    str | None,
    typer.Option(
        "--redis-url",
        envvar=ENV_REDIS_URL,
        help=(
            "redis://, rediss://, unix://, redis+cluster:// or redis+sentinel:// URL "
            "(default: the embedded local server)"
        ),
        rich_help_panel="Connection",
        show_default=False,
    ),
]
Namespace = Annotated[
    str,
    typer.Option(
        "--namespace",
        envvar=ENV_NAMESPACE,
        help="the key prefix the workers use (a tenant key in $AGENTBILL_API_KEY sets it)",
        rich_help_panel="Connection",
    ),
]
Json = Annotated[bool, typer.Option("--json", help="print JSON for a script, not a table")]


@dataclass(frozen=True)
class Session:
    """An open connection: the client for every operation, and its raw Redis connection for
    the few reads no script offers (the server's clock, a SCAN for customers)."""

    client: AgentBillClient
    redis: redis.Redis
    namespace: str
    where: str
    """Where it is connected, for people: the URL without its password."""


@contextmanager
def session(redis_url: str | None, namespace: str) -> Iterator[Session]:
    """Connect as a worker would (same timeouts, no redis-py retries, a tenant key from
    ``$AGENTBILL_API_KEY`` if set); close on exit."""
    api_key = os.environ.get(ENV_API_KEY) or None
    settings = _core.settings_from(api_key=api_key, redis_url=redis_url, namespace=namespace)
    raw: redis.Redis
    raw, _ = from_url(redis.Redis, redis.BlockingConnectionPool, settings)
    try:
        with AgentBillClient(api_key=api_key, redis=raw, namespace=settings.namespace) as client:
            yield Session(client, raw, settings.namespace, shown_url(redis_url))
    finally:
        raw.close()


SECRET_QUERY = ("password", "secret", "token")
"""A URL query parameter whose name holds one of these is a secret (redis-py takes
``?password=``, for one)."""


def shown_url(url: str | None) -> str:
    """``url`` fit to print: its password, in the userinfo or the query string, as ``***``."""
    if url is None:
        return "the local server"
    parts = urlsplit(url)
    pairs = parse_qsl(parts.query, keep_blank_values=True)
    secret = [any(s in name.lower() for s in SECRET_QUERY) for name, _ in pairs]
    if parts.password is None and not any(secret):
        return url
    if parts.password is not None:
        host = parts.netloc.rpartition("@")[2]
        parts = parts._replace(netloc=f"{parts.username or ''}:***@{host}")
    if any(secret):
        query = [(n, "***" if hide else v) for (n, v), hide in zip(pairs, secret, strict=True)]
        parts = parts._replace(query=urlencode(query, safe="*/"))
    return urlunsplit(parts)


def bad_input(message: str, param: str | None = None) -> NoReturn:
    """Refuse the command line's input (exit 2), naming the option or argument."""
    raise typer.BadParameter(message, param_hint=param)
