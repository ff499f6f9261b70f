"""``edgeward serve`` (the HTTP API) and ``edgeward api-key`` (hashed client keys).

Imports of ``api`` / ``runtime_guard`` happen inside the commands so the rest
of the CLI never pays for them (and ``serve`` never imports torch).
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from hardening.cli.common import JSON_OPT, console, handle_errors, print_json
from hardening.errors import InputError


def _input_error(exc: Exception) -> InputError:
    check = getattr(exc, "check", None)
    return InputError(f"{check}: {exc}" if check else str(exc))


def register(app: typer.Typer, audit: typer.Typer) -> None:
    """Add ``serve`` and the ``api-key`` group."""

    @app.command("serve")
    @handle_errors
    def serve(
        bundle: Optional[Path] = typer.Argument(None, help="Signed bundle (.ewb) to serve; optional with --watch."),
        public_key: Path = typer.Option(..., "--public-key", help="Pinned Ed25519 public key (PEM)."),
        key_file: Optional[Path] = typer.Option(None, "--key-file", help="KEK file (0600; raw, hex or base64)."),
        kek_env: Optional[str] = typer.Option(None, "--kek-env", help="Read the KEK from this environment variable instead."),
        device_key: Optional[Path] = typer.Option(None, "--device-key", help="X25519 device key (0600): each bundle's KEK from BUNDLE.recipients.json (needs --device-id)."),
        passphrase_env: Optional[str] = typer.Option(None, "--passphrase-env", help="Environment variable holding the passphrase of passphrase-wrapped bundles."),
        host: str = typer.Option("127.0.0.1", "--host", help="Bind address (loopback unless told otherwise)."),
        port: int = typer.Option(8080, "--port", help="TCP port (0 = pick a free one)."),
        workers: int = typer.Option(1, "--workers", help="Worker processes sharing the port (SO_REUSEPORT)."),
        threads: int = typer.Option(4, "--threads", help="waitress threads per worker."),
        storage_uri: str = typer.Option("memory://", "--storage-uri", help="Rate-limit storage (memory:// or redis://host:port)."),
        require_shared_storage: bool = typer.Option(False, "--require-shared-storage", help="Refuse memory:// storage with --workers > 1 instead of warning."),
        api_keys: Optional[Path] = typer.Option(None, "--api-keys", help="Keys file from 'edgeward api-key add' (enables auth)."),
        admin_token_file: Optional[Path] = typer.Option(None, "--admin-token-file", help="Admin token file (0600; enables admin endpoints)."),
        rollback_state: Optional[Path] = typer.Option(None, "--rollback-state", help="Anti-rollback state file."),
        watch: Optional[Path] = typer.Option(None, "--watch", help="Poll this directory for new *.ewb bundles."),
        watch_interval: float = typer.Option(2.0, "--watch-interval", help="Seconds between directory scans."),
        max_body_bytes: int = typer.Option(8 * 1024 * 1024, "--max-body-bytes", help="Largest request body (413 above)."),
        rollback_error_rate: float = typer.Option(0.2, "--rollback-error-rate", help="Roll a hot update back above this error rate."),
        rollback_min_requests: int = typer.Option(20, "--rollback-min-requests", help="Requests before the error rate is judged."),
        probation_seconds: float = typer.Option(60.0, "--probation-seconds", help="How long a hot update stays on probation."),
        rate_limit_headers: str = typer.Option("refusals", "--rate-limit-headers", help="RateLimit-* headers on 429s only ('refusals') or on every answer ('always')."),
        load_deadline: float = typer.Option(20.0, "--load-deadline", help="Seconds a candidate bundle (verify, admit, smoke runs) may take; past it: refused."),
        header_timeout: float = typer.Option(10.0, "--header-timeout", help="Seconds a connection may take to send a request's headers."),
        max_connections: int = typer.Option(1000, "--max-connections", help="Open connections per worker."),
        max_connections_per_peer: int = typer.Option(64, "--max-connections-per-peer", help="Open connections per client address per worker."),
        connection_reserve: int = typer.Option(50, "--connection-reserve", help="Connections kept for addresses that hold none yet."),
        update_from: Optional[str] = typer.Option(None, "--update-from", help="TUF repository URL to take updates from (needs edgeward[fleet])."),
        state_dir: Optional[Path] = typer.Option(None, "--state-dir", help="Device state (TUF metadata, A/B slots); turns anti-rollback on."),
        device_id: Optional[str] = typer.Option(None, "--device-id", help="Stable device id (rollout cohort)."),
        trusted_root: Optional[Path] = typer.Option(None, "--trusted-root", help="Repository root.json for the first update."),
        update_channel: str = typer.Option("stable", "--update-channel", help="Release channel."),
        update_interval: float = typer.Option(60.0, "--update-interval", help="Seconds between update checks."),
        allow_unattested: bool = typer.Option(False, "--allow-unattested", help="Accept releases without an in-toto attestation."),
        max_rejection_increase: float = typer.Option(0.25, "--rollback-rejection-increase", help="Roll back when the rejected/flagged share rises by more than this."),
        max_latency_ratio: float = typer.Option(3.0, "--rollback-latency-ratio", help="Roll back when mean latency exceeds this multiple of the previous bundle's."),
        max_psi: float = typer.Option(0.5, "--rollback-psi", help="Roll back when class-drift PSI exceeds this."),
        access_log: bool = typer.Option(True, "--access-log/--no-access-log", help="One JSON line per request on stderr (request id, route, status, decision, latency, client hash)."),
        grpc_port: Optional[int] = typer.Option(None, "--grpc-port", help="Also serve OIP v2 over gRPC on this port (same host; needs edgeward[grpc])."),
    ) -> None:
        """Serve a signed bundle over HTTP (waitress): /v1/predict, /v1/model, /healthz,
        /readyz, /metrics, /openapi.json, /v1/admin/*, KServe /v2/*."""
        from api.config import ApiConfig
        from api.reload import RollbackTrigger
        from api.server import ServerSettings
        from api.server import serve as run
        from runtime_guard.errors import LoadError

        if bundle is None and watch is None and update_from is None:
            raise InputError("give a BUNDLE, --watch DIR or --update-from URL")
        rules = None
        if update_from is not None:
            import importlib.util

            if importlib.util.find_spec("tuf") is None:
                raise InputError("--update-from needs the 'fleet' extra (python-tuf), which is not "
                                 "installed: pip install 'edgeward[fleet]'")
            if state_dir is None or not device_id:
                raise InputError("--update-from needs --state-dir and --device-id")
            if workers != 1:
                raise InputError("--update-from runs with --workers 1 (one updater owns the state directory)")
            from runtime_guard.update.triggers import ProbationRules

            try:
                rules = ProbationRules(min_requests=rollback_min_requests,
                                       max_rejection_increase=max_rejection_increase,
                                       max_latency_ratio=max_latency_ratio, max_psi=max_psi)
            except ValueError as exc:
                raise InputError(str(exc)) from None
        if sum(x is not None for x in (key_file, kek_env, passphrase_env, device_key)) != 1:
            raise InputError("give exactly one of --key-file, --kek-env, --passphrase-env or --device-key")
        try:
            cfg = ApiConfig(
                bundle=str(bundle) if bundle else None, public_key=str(public_key),
                kek_file=str(key_file) if key_file else None, kek_env=kek_env,
                passphrase_env=passphrase_env, load_deadline_s=load_deadline,
                device_key_file=str(device_key) if device_key else None,
                rollback_state=str(rollback_state) if rollback_state else None,
                storage_uri=storage_uri, api_keys_file=str(api_keys) if api_keys else None,
                admin_token_file=str(admin_token_file) if admin_token_file else None,
                watch_dir=str(watch) if watch else None, watch_interval_s=watch_interval,
                max_body_bytes=max_body_bytes, rate_limit_headers=rate_limit_headers, access_log=access_log,
                rollback_trigger=RollbackTrigger(rollback_error_rate, rollback_min_requests, probation_seconds),
                update_from=update_from, state_dir=str(state_dir) if state_dir else None, device_id=device_id,
                trusted_root=str(trusted_root) if trusted_root else None, update_channel=update_channel,
                update_interval_s=update_interval, require_attestation=not allow_unattested,
                probation_rules=rules,
            )
            settings = ServerSettings(host, port, workers, threads, require_shared_storage,
                                      header_timeout_s=header_timeout, max_connections=max_connections,
                                      max_connections_per_peer=max_connections_per_peer,
                                      connection_reserve=connection_reserve, grpc_port=grpc_port)
            code = run(cfg, settings)
        except (LoadError, ValueError, OSError, LookupError) as exc:  # the bundle could not be
            raise _input_error(exc) from None  # served (LoadError), or ServerConfigError, AuthConfigError
        raise typer.Exit(code)

    keys_app = typer.Typer(help="Manage hashed API keys and the admin token.", no_args_is_help=True)

    @keys_app.command("add")
    @handle_errors
    def add(
        keys_file: Path = typer.Argument(..., help="Keys file (created 0600 if missing)."),
        key_id: str = typer.Option(..., "--id", help="Name of the client; becomes its rate-limit id."),
        json_out: bool = JSON_OPT,
    ) -> None:
        """Create a key; prints it once (only its SHA-256 is stored)."""
        from api.auth import AuthConfigError, add_key

        try:
            key = add_key(keys_file, key_id)
        except AuthConfigError as exc:
            raise InputError(str(exc)) from None
        except OSError as exc:  # e.g. the folder does not exist: one line, exit 2
            raise InputError(f"cannot write {keys_file}: {exc.strerror or type(exc).__name__}") from None
        if json_out:
            print_json({"id": key_id, "key": key, "keys_file": str(keys_file)})
        else:
            console.print(f"key for [bold]{key_id}[/bold] (shown once):", highlight=False)
            typer.echo(key)

    @keys_app.command("remove")
    @handle_errors
    def remove(keys_file: Path = typer.Argument(...), key_id: str = typer.Option(..., "--id")) -> None:
        """Revoke a key."""
        from api.auth import AuthConfigError, remove_key

        try:
            remove_key(keys_file, key_id)
        except AuthConfigError as exc:
            raise InputError(str(exc)) from None
        except OSError as exc:
            raise InputError(f"cannot write {keys_file}: {exc.strerror or type(exc).__name__}") from None

    @keys_app.command("list")
    @handle_errors
    def list_keys(keys_file: Path = typer.Argument(...), json_out: bool = JSON_OPT) -> None:
        """Key ids and creation times (never the keys)."""
        from api.auth import AuthConfigError, KeyStore

        try:
            store = KeyStore.load(keys_file)
        except AuthConfigError as exc:
            raise InputError(str(exc)) from None
        rows = [{"id": e.key_id, "created_at": e.created_at} for e in store.entries]
        if json_out:
            print_json(rows)
        else:
            for r in rows:
                typer.echo(f"{r['id']}\t{r['created_at']}")

    @keys_app.command("admin-token")
    @handle_errors
    def admin_token(out: Path = typer.Argument(..., help="Token file to create (0600, never overwritten).")) -> None:
        """Create a random admin token file for --admin-token-file."""
        from api.auth import generate_admin_token
        from runtime_guard.bundle import write_secret_file

        try:
            write_secret_file(out, generate_admin_token().encode("ascii"))
        except OSError as exc:
            raise InputError(f"cannot create {out}: {exc.strerror}") from None
        console.print(f"admin token written to {out}", highlight=False)

    app.add_typer(keys_app, name="api-key")
