"""Issue 14: ``p2v serve`` against the attacks and faults of the outside review, through real sockets.

Slow hellos and silent sockets, wrong tokens, weak and loose tokens, TLS, the Unix socket,
client-named paths, a killed server's spool, a full spool and a full ``--out``, slow readers,
upscaling. Everything stays on loopback (or a Unix socket in a test folder), bounded in time.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import stat
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from test_server import (  # the shared helpers of the server tests
    HOST,
    ROOT,
    TOKEN_ENV,
    RunningServer,
    _readline_with_timeout,
    echo_settings,
    read_until_closed,
    rgb_frames,
    run_all,
)

from p2v_runtime import protocol as P
from p2v_runtime.client import Client, ConnectionLost, RemoteError, edit_on_server
from p2v_runtime.server import Server
from p2v_runtime.server.cli import main as serve_cli
from p2v_runtime.server.cli import remote_token_problem
from p2v_runtime.server.echo import echo_job_runner
from p2v_runtime.server.paths import PathRules, default_cache_root
from p2v_runtime.server.spool import OWNER_FILE, pid_alive

STRONG = "Vq7LwR2nXc9TzA4bKp1sYe6HmU3gDj8F"  # 32 characters, 32 different ones
POSIX = os.name == "posix"
UNIX = hasattr(socket, "AF_UNIX") and POSIX


@pytest.fixture
def start():
    started: list[RunningServer] = []

    def launch(*args: str, env: dict | None = None, preexec_fn=None) -> RunningServer:
        started.append(RunningServer(*args, env=env, preexec_fn=preexec_fn))
        return started[-1]

    yield launch
    for running in started:
        running.stop()


def hello_bytes(token: str) -> bytes:
    return P.pack({"type": "hello", "token": token, "protocol": P.PROTOCOL_VERSION})


def say_hello(port: int, token: str, timeout: float = 10) -> P.Message:
    with socket.create_connection((HOST, port), timeout=timeout) as sock:
        sock.sendall(hello_bytes(token))
        return P.read_message(sock)


def wrong_token_lines(running: RunningServer) -> list[str]:
    return [line for line in running.stderr_lines if "wrong token" in line]


# --- 1. slots, the hello deadline, idle -----------------------------------------------------------


def test_a_slow_hello_is_cut_at_the_hello_deadline_and_never_keeps_a_client_out(start):
    """The review's slowloris: 65,536-byte headers announced, one byte every half second."""
    running = start("--read-timeout", "30", "--hello-timeout", "1.5")
    prefix = P.PREFIX.pack(P.MAGIC, P.PROTOCOL_VERSION, P.MAX_HEADER_BYTES, 0)
    drippers = [socket.create_connection((HOST, running.port), timeout=5) for _ in range(16)]
    stop = threading.Event()

    def drip():
        while not stop.is_set():
            for sock in drippers:
                try:
                    sock.send(b" ")
                except OSError:
                    pass
            stop.wait(0.5)

    try:
        for sock in drippers:
            sock.sendall(prefix)
        dripping = threading.Thread(target=drip, daemon=True)
        dripping.start()
        time.sleep(0.3)
        started = time.monotonic()
        with running.client() as client:  # all 16 waiting places are taken: the oldest makes room
            assert client.ping() < 5
        assert time.monotonic() - started < 1.0
        codes = []
        for sock in drippers:  # each makes progress, but the whole hello must come within 1.5 s
            messages = read_until_closed(sock, timeout=10)
            codes.append(messages[-1]["code"] if messages else None)
        elapsed = time.monotonic() - started
        assert set(codes) <= {P.E_TIMEOUT, P.E_TOO_MANY} and codes.count(P.E_TIMEOUT) >= 14, codes
        assert elapsed < 4, elapsed
    finally:
        stop.set()
        for sock in drippers:
            sock.close()
    assert running.alive()


def test_waiting_connections_do_not_take_client_slots_and_clients_have_their_cap(start):
    running = start("--read-timeout", "30", "--hello-timeout", "5")
    silent = [socket.create_connection((HOST, running.port), timeout=5) for _ in range(12)]
    clients = []
    try:
        for _ in range(8):  # the silent sockets hold none of the 8 client slots
            clients.append(running.client())
        with pytest.raises(RemoteError) as info:  # a 9th authenticated client is one too many
            running.client()
        assert info.value.code == P.E_TOO_MANY and "8 clients" in info.value.message
        clients.pop().close()
        deadline = time.monotonic() + 5
        while True:  # the slot frees as soon as the server notices the close
            try:
                clients.append(running.client())
                break
            except RemoteError as exc:
                assert exc.code == P.E_TOO_MANY and time.monotonic() < deadline
                time.sleep(0.05)
        assert all(client.ping() < 5 for client in clients)
    finally:
        for client in clients:
            client.close()
        for sock in silent:
            sock.close()


def test_only_authenticated_activity_keeps_an_idle_server_alive(start):
    """Connecting every 0.3 s and sending nothing no longer keeps --idle-timeout 1 from firing."""
    running = start("--idle-timeout", "1")
    started = time.monotonic()
    while running.alive() and time.monotonic() - started < 6:
        try:
            socket.create_connection((HOST, running.port), timeout=1).close()
        except OSError:
            break
        time.sleep(0.3)
    assert running.proc.wait(10) == 0
    assert time.monotonic() - started < 4
    assert "unused" in running.stderr()


# --- 4. tokens: wrong guesses, strength, files, TLS ------------------------------------------------


def test_wrong_tokens_make_their_address_wait_longer_each_time_and_are_logged_sparingly(start):
    running = start("--read-timeout", "30", "--hello-timeout", "8", env=dict(TOKEN_ENV, P2V_TOKEN=STRONG))
    guesses = []
    stop = time.monotonic() + 2.0

    def guess(worker: int):
        n = 0
        while time.monotonic() < stop:
            try:
                with socket.create_connection((HOST, running.port), timeout=5) as sock:
                    sock.settimeout(max(0.05, stop - time.monotonic()))  # give up waiting when the 2 s are over
                    sock.sendall(hello_bytes(f"guess-{worker}-{n}"))
                    reply = P.read_message(sock)
            except (OSError, P.ProtocolError):
                continue
            guesses.append(reply["code"] if reply is not None and reply.type == "error" else reply)
            n += 1

    workers = [threading.Thread(target=guess, args=(i,)) for i in range(6)]  # in parallel: one try per wait
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(20)
    # 0.1 + 0.2 + 0.4 + 0.8 s between tries: about 5 in 2 s (before: about 270, each logged).
    assert 2 <= guesses.count(P.E_AUTH) <= 7, guesses
    time.sleep(0.5)
    assert len(wrong_token_lines(running)) <= 2, wrong_token_lines(running)
    started = time.monotonic()
    reply = say_hello(running.port, STRONG)  # the right token still gets in, after the address's wait
    assert reply.type == "hello_ok" and time.monotonic() - started < 5.5


@pytest.mark.parametrize(
    "token, ok",
    [("a", False), ("correct-horse", False), ("ab" * 20, False), ("x" * 30, False), (STRONG, True)],
)
def test_a_server_other_machines_can_reach_needs_a_strong_token(token, ok, monkeypatch, capsys):
    """Checked before anything listens: here ``bind`` fails on purpose, so nothing ever does."""

    def no_bind(self):
        raise OSError("tests never listen on a non-loopback address")

    monkeypatch.setattr(Server, "bind", no_bind)
    monkeypatch.setenv("P2V_TOKEN", token)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)  # serve_main sets it for a remote-facing server
    code = serve_cli(["--host", "0.0.0.0", "--allow-remote", "--job-runner", "echo"])
    err = capsys.readouterr().err
    if ok:
        assert code == 1 and "tests never listen" in err
    else:
        assert code == 2 and "too weak" in err and "--new-token" in err and err.count("\n") == 1
    assert remote_token_problem(token) is None if ok else remote_token_problem(token)


def test_new_token_prints_or_writes_a_file_only_its_user_can_read(tmp_path, capsys):
    assert serve_cli(["--new-token"]) == 0
    printed = capsys.readouterr().out.strip()
    assert len(printed) == 43 and remote_token_problem(printed) is None
    target = tmp_path / "token"
    assert serve_cli(["--new-token", str(target)]) == 0
    token = target.read_text().strip()
    assert len(token) == 43 and token != printed
    if POSIX:
        assert stat.S_IMODE(target.stat().st_mode) == 0o600
    assert serve_cli(["--new-token", str(target)]) == 2  # never over an existing file
    assert "already exists" in capsys.readouterr().err and target.read_text().strip() == token


@pytest.mark.skipif(not POSIX, reason="file modes are POSIX")
def test_token_file_readable_by_others_or_not_utf8_is_one_line(tmp_path):
    loose = tmp_path / "loose"
    loose.write_text(STRONG)
    loose.chmod(0o644)
    binary = tmp_path / "binary"
    binary.write_bytes(b"abc\xffdef")
    binary.chmod(0o600)
    for path, needle in ((loose, "chmod 600"), (binary, "not UTF-8")):
        out = subprocess.run(
            [sys.executable, "-m", "p2v_runtime.server", "--token-file", str(path), "--job-runner", "echo"],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=30,
            env=TOKEN_ENV,
        )
        assert out.returncode == 2 and out.stdout == "", out.stderr
        assert needle in out.stderr and out.stderr.count("\n") == 1 and "Traceback" not in out.stderr
    # A P2V_TOKEN with a byte that is not UTF-8: one line, not "internal" to every hello.
    env = {os.fsencode(k): os.fsencode(v) for k, v in TOKEN_ENV.items()}
    env[b"P2V_TOKEN"] = b"abc\xffdef"
    out = subprocess.run(
        [sys.executable, "-m", "p2v_runtime.server", "--job-runner", "echo"],
        cwd=ROOT,
        capture_output=True,
        timeout=30,
        env=env,
    )
    assert out.returncode == 2 and b"P2V_TOKEN is not UTF-8" in out.stderr and out.stderr.count(b"\n") == 1
    # The client side: p2v ping with such a token file, p2v edit --server with such a P2V_TOKEN.
    ping = subprocess.run(
        [sys.executable, "-m", "p2v_runtime.cli", "ping", "--port", "1", "--token-file", str(binary)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=30,
        env=TOKEN_ENV,
    )
    assert ping.returncode == 1 and "not UTF-8" in ping.stderr and "Traceback" not in ping.stderr


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True, timeout=60)


def _certificates_with_openssl(folder: Path) -> None:
    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes", "-days", "2"]
    for name in ("ca", "other-ca"):
        _openssl(
            "req", "-x509", *ec, "-keyout", f"{name}.key", "-out", f"{name}.pem", "-subj", f"/CN=p2v test {name}",
            "-addext", "basicConstraints=critical,CA:TRUE", "-addext", "keyUsage=critical,keyCertSign,cRLSign",
            cwd=folder,
        )  # fmt: skip
    _openssl(
        "req", "-new", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
        "-keyout", "server.key", "-out", "server.csr", "-subj", "/CN=127.0.0.1", cwd=folder,
    )  # fmt: skip
    (folder / "ext.cnf").write_text(
        "subjectAltName=IP:127.0.0.1,DNS:localhost\nbasicConstraints=CA:FALSE\n"
        "keyUsage=digitalSignature\nextendedKeyUsage=serverAuth\n"
    )
    _openssl(
        "x509", "-req", "-in", "server.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial",
        "-out", "server.pem", "-days", "2", "-extfile", "ext.cnf", cwd=folder,
    )  # fmt: skip


def _certificates_with_cryptography(folder: Path) -> None:
    import datetime
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    now = datetime.datetime.now(datetime.timezone.utc)

    def name(text: str) -> x509.Name:
        return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, text)])

    def write(stem: str, key, certificate) -> None:
        (folder / f"{stem}.key").write_bytes(
            key.private_bytes(
                serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
            )
        )
        (folder / f"{stem}.pem").write_bytes(certificate.public_bytes(serialization.Encoding.PEM))

    def builder(subject: str, issuer: str, key):
        return (
            x509.CertificateBuilder()
            .subject_name(name(subject))
            .issuer_name(name(issuer))
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=2))
        )

    ca_key = None
    for stem in ("ca", "other-ca"):
        key = ec.generate_private_key(ec.SECP256R1())
        usage = x509.KeyUsage(False, False, False, False, False, True, True, False, False)  # cert and CRL signing
        certificate = (
            builder(f"p2v test {stem}", f"p2v test {stem}", key)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(usage, critical=True)
            .sign(key, hashes.SHA256())
        )
        write(stem, key, certificate)
        ca_key = key if stem == "ca" else ca_key
    key = ec.generate_private_key(ec.SECP256R1())
    alt = x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1")), x509.DNSName("localhost")])
    certificate = (
        builder("127.0.0.1", "p2v test ca", key)
        .add_extension(alt, critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    write("server", key, certificate)


@pytest.fixture(scope="module")
def certificates(tmp_path_factory) -> dict[str, Path]:
    """A test CA, a certificate it signs for 127.0.0.1, and a second CA that signs nothing we serve.

    Made with the cryptography package when it is installed, else with the openssl command.
    """
    folder = tmp_path_factory.mktemp("tls")
    try:
        import cryptography  # noqa: F401
    except ImportError:
        if shutil.which("openssl") is None:
            pytest.skip("neither the cryptography package nor the openssl command is here")
        _certificates_with_openssl(folder)
    else:
        _certificates_with_cryptography(folder)
    (folder / "server.key").chmod(0o600)
    return {name: folder / f"{name}" for name in ("ca.pem", "other-ca.pem", "server.pem", "server.key")}


def test_tls_runtime_serves_tls_clients_and_tells_plain_ones_why(start, certificates, capsys, monkeypatch):
    running = start("--tls-cert", str(certificates["server.pem"]), "--tls-key", str(certificates["server.key"]))
    assert running.ready["tls"] is True
    ca = str(certificates["ca.pem"])
    with running.client(tls_ca=ca) as client:
        assert client.ping() < 5
        # Reader and writer threads share the TLS connection: frames in while results come out.
        frames = rgb_frames(12, 160, 120, seed=3)
        results, _, final = run_all(client, echo_settings("steps=2"), frames, 160, 120)
        assert final.type == "done" and [bytes(m.payload) for m in results] == frames
        results, _, final = run_all(client, {"prompt": "echo", "depth_norm": "frame"}, frames, 160, 120, window=2)
        assert final.type == "done" and [bytes(m.payload) for m in results] == frames
    with pytest.raises(RemoteError) as info:  # a client without TLS hears why, in plain
        running.client()
    assert info.value.code == P.E_TLS and "--tls-ca" in info.value.message
    with pytest.raises(ConnectionLost, match="does not vouch"):
        running.client(tls_ca=str(certificates["other-ca.pem"]))
    # p2v ping and p2v edit --server take --tls-ca.
    from p2v_runtime import cli

    monkeypatch.setenv("P2V_TOKEN", running.token)
    assert cli.main(["ping", "--server", running.address, "--tls-ca", ca]) == 0
    assert "pong from" in capsys.readouterr().out
    assert cli.main(["ping", "--server", running.address]) == 1
    assert "speaks TLS" in capsys.readouterr().err
    np = pytest.importorskip("numpy")
    arrays = [np.full((8, 8, 3), i * 30, np.uint8) for i in range(2)]
    edited = list(edit_on_server(running.address, _Frames(arrays), {"prompt": "echo"}, tls_ca=ca))
    assert [i for i, _ in edited] == [0, 1] and all(np.array_equal(a, b) for (_, a), b in zip(edited, arrays))


def test_tls_options_that_cannot_work_are_one_line(certificates, tmp_path):
    encrypted = tmp_path / "encrypted.key"
    if shutil.which("openssl") is None:
        pytest.skip("the openssl command makes the encrypted key")
    _openssl("pkey", "-in", str(certificates["server.key"]), "-aes256", "-passout", "pass:secret", "-out",
             str(encrypted), cwd=tmp_path)  # fmt: skip
    for args, needle in (
        (["--tls-cert", str(certificates["server.pem"]), "--tls-key", str(encrypted)], "encrypted"),
        (["--tls-cert", str(tmp_path / "missing.pem")], "cannot read the TLS certificate"),
        (["--tls-key", str(certificates["server.key"])], "--tls-key needs --tls-cert"),
        *([(["--unix", str(tmp_path / "s"), "--tls-cert", str(certificates["server.pem"])], "needs no TLS")] * UNIX),
    ):
        out = _serve_once(*args)
        assert out.returncode == 2 and needle in out.stderr and out.stderr.count("\n") == 1, out.stderr


def test_a_tls_client_of_a_plain_runtime_gets_one_clear_line(start, certificates):
    running = start()
    with pytest.raises(ConnectionLost, match="is it started with --tls-cert"):
        running.client(tls_ca=str(certificates["ca.pem"]), connect_timeout=5)
    assert running.alive()


class _Frames:
    def __init__(self, arrays):
        self.arrays = arrays
        self.size = (arrays[0].shape[1], arrays[0].shape[0])
        self.description = "test frames"

    def __len__(self):
        return len(self.arrays)

    def read(self, index):
        return self.arrays[index]


# --- 8. the Unix socket ---------------------------------------------------------------------------


def _short_dir() -> Path:
    """A folder whose socket path fits the ~100 characters Unix sockets allow (pytest's may not)."""
    import tempfile

    return Path(tempfile.mkdtemp(prefix="p2v-t-", dir="/tmp" if os.path.isdir("/tmp") else None))


@pytest.mark.skipif(not UNIX, reason="Unix sockets")
def test_unix_socket_runtime_is_private_and_replaces_only_a_stale_socket(start, tmp_path, capsys, monkeypatch):
    folder = _short_dir()
    try:
        path = folder / "rt.sock"
        running = start("--unix", str(path))
        assert running.ready["unix"] == str(path) and running.ready["address"] == f"unix:{path}"
        assert "port" not in running.ready
        assert stat.S_ISSOCK(path.lstat().st_mode) and stat.S_IMODE(path.lstat().st_mode) == 0o600
        with running.client() as client:
            frames = rgb_frames(3, 8, 8)
            results, _, final = run_all(client, echo_settings(), frames, 8, 8)
            assert final.type == "done" and [bytes(m.payload) for m in results] == frames
        from p2v_runtime import cli

        monkeypatch.setenv("P2V_TOKEN", running.token)
        assert cli.main(["ping", "--server", f"unix:{path}"]) == 0
        assert f"pong from unix:{path}" in capsys.readouterr().out
        # A second runtime on a live socket is refused; so is a path that is not a socket.
        second = _serve_once("--unix", str(path))
        assert second.returncode == 1 and "another process listens" in second.stderr
        other = folder / "file"
        other.write_text("not a socket")
        refused = _serve_once("--unix", str(other))
        assert refused.returncode == 1 and "not a socket" in refused.stderr and other.read_text() == "not a socket"
        assert _serve_once("--unix", str(path), "--allow-remote").returncode == 2
        assert running.stop() == 0 and not path.exists()  # removed on the way out
        # A socket left by a killed runtime is stale: the next one takes its place.
        killed = start("--unix", str(path))
        killed.proc.send_signal(signal.SIGKILL)
        killed.proc.wait(10)
        assert path.exists()
        again = start("--unix", str(path))
        with again.client() as client:
            assert client.ping() < 5
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def _serve_once(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "p2v_runtime.server", "--job-runner", "echo", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=30,
        env=TOKEN_ENV,
    )


# --- 3. paths from the wire -----------------------------------------------------------------------


def _job_error(client: Client, settings: dict) -> RemoteError:
    with pytest.raises(RemoteError) as info:
        run_all(client, settings, rgb_frames(1, 4, 4), 4, 4)
    assert not info.value.fatal
    return info.value


def test_client_named_paths_must_resolve_inside_the_servers_folders(start, tmp_path):
    models = tmp_path / "models"
    (models / "sd2").mkdir(parents=True)
    cache_root = tmp_path / "cache-root"
    cache_root.mkdir()
    outside = tmp_path / "outside"
    outside.mkdir()
    (models / "escape").symlink_to(outside, target_is_directory=True)
    hub_cache = tmp_path / "hf"
    hub_cache.mkdir()
    env = dict(TOKEN_ENV, HF_HUB_CACHE=str(hub_cache))
    running = start(
        "--models-dir", str(models), "--cache-root", str(cache_root), "--no-allow-downloads", env=env
    )  # fmt: skip
    with running.client() as client:
        inside = str(models / "sd2")
        cases = [
            ({"model": "/etc/shadow"}, "settings", "inside the runtime's model folders"),
            ({"model": str(models / ".." / "outside")}, "settings", "inside the runtime's model folders"),
            ({"model": str(models / "escape")}, "settings", "inside the runtime's model folders"),  # a symlink out
            ({"model": inside, "captioner": "~/../../etc", "source_prompt": ""}, "settings", "Captioner (--captioner)"),
            ({"model": inside, "cache_dir": str(cache_root / ".." / ".." / "evil")}, "settings", "cache root"),
            ({"model": inside, "cache_dir": 5}, "settings", "must be text"),
            ({"model": ["x"]}, "settings", "must be text"),
            ({"model": "someone/not-cached"}, "settings", "--allow-downloads"),
        ]
        for values, code, needle in cases:
            error = _job_error(client, {"prompt": "echo", "source_prompt": "a car", **values})
            assert error.code == code and needle in error.message, (values, error)
            assert "internal" not in error.code
        assert not (tmp_path / "evil").exists()
        # Inside the folders all is well (the echo runner loads nothing, but the rules ran).
        ok = {"prompt": "echo", "source_prompt": "a car", "model": inside, "cache_dir": str(cache_root / "mine")}
        _, _, final = run_all(client, ok, rgb_frames(1, 4, 4), 4, 4)
        assert final.type == "done"


def test_default_path_rules_loopback_trusts_its_user_remote_allows_nothing_unasked(tmp_path):
    local = PathRules.for_server(remote=False)
    assert local == PathRules(None, None, True)
    remote = PathRules.for_server(remote=True)
    assert remote.models_dirs == () and remote.cache_root == default_cache_root() and not remote.allow_downloads
    from p2v_runtime.settings import EditSettings, SettingsError

    folder = tmp_path / "m"
    folder.mkdir()
    assert local.apply(EditSettings(prompt="x", model=str(folder))).model == str(folder)
    with pytest.raises(SettingsError, match="without --models-dir"):
        remote.apply(EditSettings(prompt="x", model=str(folder)))
    with pytest.raises(SettingsError, match="--allow-downloads"):
        remote.apply(EditSettings(prompt="x", model="org/model-not-in-any-cache"))
    fetching = PathRules(remote.models_dirs, remote.cache_root, True)
    applied = fetching.apply(EditSettings(prompt="x", model="org/model", captioner="org/blip"))
    assert applied.cache_dir == os.path.join(default_cache_root(), "inversions")  # the default, inside the root


def test_errors_to_a_client_on_another_machine_carry_no_loader_text(tmp_path):
    """A loader's exception text (which can quote the file it read) stays in the log for a remote peer."""
    from p2v_runtime.errors import ModelLoadError

    secret = "root:$6$secret-hash"

    def leaky_runner(frames, settings, **_):
        if "internal" in settings.prompt:
            raise RuntimeError(f"could not parse {secret}")
        raise ModelLoadError(f"cannot load model 'x' ({secret}); hint", public="cannot load model 'x': see the log")
        yield  # a generator, like every runner

    server = Server(HOST, 0, token=STRONG, job_runner=leaky_runner, spool_dir=str(tmp_path), auth_backoff=0)
    for local in (False, True):
        for prompt in ("load", "internal"):
            ours, theirs = socket.socketpair()
            with ours, theirs:
                worker = threading.Thread(
                    target=server.handle_connection, args=(theirs, "peer"), kwargs={"local": local}
                )
                worker.start()
                ours.settimeout(10)
                ours.sendall(hello_bytes(STRONG))
                assert P.read_message(ours).type == "hello_ok"
                ours.sendall(P.pack({"type": "job", "settings": {"prompt": prompt}, "frames": 1, "width": 2,
                                     "height": 2, "depth": False}))  # fmt: skip
                assert P.read_message(ours).type == "job_ok"
                ours.sendall(P.pack(P.frame_header("frame", 0, 2, 2), bytes(12)))
                messages = []
                while not messages or messages[-1].type != "error":
                    messages.append(P.read_message(ours))
                ours.shutdown(socket.SHUT_WR)
                worker.join(10)
            message = messages[-1]["message"]
            assert (secret in message) == local, (local, prompt, message)
            if not local:
                assert "log" in message


# --- 5. disk and process faults -------------------------------------------------------------------


def test_job_folders_of_dead_runtimes_are_swept_and_live_ones_kept(start, tmp_path):
    spool = tmp_path / "spool"
    spool.mkdir()
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    assert not pid_alive(gone.pid)
    host = socket.gethostname()
    owners = {
        "p2v-job-dead": f"{gone.pid} {host}",
        "p2v-job-live": f"{os.getpid()} {host}",
        "p2v-job-elsewhere": f"{gone.pid} another-host",
        "p2v-job-no-owner": None,
        "unrelated-dead": f"{gone.pid} {host}",
    }
    for name, owner in owners.items():
        (spool / name).mkdir()
        (spool / name / "frames.rgb").write_bytes(bytes(1000))
        if owner is not None:
            (spool / name / OWNER_FILE).write_text(owner + "\n")
    running = start("--spool-dir", str(spool))
    assert sorted(p.name for p in spool.iterdir()) == sorted(set(owners) - {"p2v-job-dead"})
    assert "removed 1 job folder" in running.stderr()


def test_a_spool_left_by_kill_minus_nine_goes_when_the_next_runtime_starts(start, tmp_path):
    spool = tmp_path / "spool"
    first = start("--spool-dir", str(spool))
    with socket.create_connection((HOST, first.port), timeout=5) as sock:
        sock.sendall(hello_bytes(first.token))
        assert P.read_message(sock).type == "hello_ok"
        sock.sendall(P.pack({"type": "job", "settings": {"prompt": "echo"}, "frames": 3, "width": 64, "height": 64,
                             "depth": False}))  # fmt: skip
        assert P.read_message(sock).type == "job_ok"
        sock.sendall(P.pack(P.frame_header("frame", 0, 64, 64), bytes(64 * 64 * 3)))
        assert P.read_message(sock).type == "received"
        left = list(spool.iterdir())
        assert len(left) == 1 and (left[0] / OWNER_FILE).read_text().split()[0] == str(first.proc.pid)
        first.proc.kill()  # kill -9
        first.proc.wait(10)
    assert list(spool.iterdir()) == left  # the killed runtime could not clean up
    start("--spool-dir", str(spool))
    assert list(spool.iterdir()) == []


def _file_size_limit(limit: int):
    import resource

    def apply():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG instead
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    return apply


@pytest.mark.skipif(not POSIX, reason="RLIMIT_FSIZE stands in for a full disk")
def test_a_spool_that_fills_up_mid_upload_is_disk_full_and_the_connection_goes_on(start, tmp_path):
    spool = tmp_path / "spool"
    running = start("--spool-dir", str(spool), preexec_fn=_file_size_limit(40_000))
    with running.client() as client:
        frames = rgb_frames(8, 64, 64)  # 12 kB each: the 4th does not fit under 40 kB
        with pytest.raises(RemoteError) as info:
            run_all(client, echo_settings(), frames, 64, 64)
        assert info.value.code == P.E_DISK and not info.value.fatal
        assert "ran out of space at frame 3 of 8" in info.value.message and "--spool-dir" in info.value.message
        results, _, final = run_all(client, echo_settings(), frames[:2], 64, 64)  # a job that fits still runs
        assert final.type == "done" and [bytes(m.payload) for m in results] == frames[:2]
    assert running.alive() and list(spool.iterdir()) == []


@pytest.mark.skipif(not POSIX, reason="RLIMIT_FSIZE stands in for a full disk")
def test_edit_on_a_server_into_a_full_out_folder_is_one_line(start, tmp_path):
    np = pytest.importorskip("numpy")
    from PIL import Image

    running = start()
    clip = tmp_path / "clip"
    clip.mkdir()
    rng = np.random.default_rng(0)
    for index in range(2):
        Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(clip / f"{index:03d}.png")
    out = subprocess.run(
        [sys.executable, "-m", "p2v_runtime.cli", "edit", str(clip), "--out", str(tmp_path / "out"), "--prompt",
         "echo", "--quiet", "--server", running.address],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        env=dict(TOKEN_ENV, P2V_TOKEN=running.token),
        preexec_fn=_file_size_limit(2_000),  # a random 64x64 PNG is about 12 kB
    )  # fmt: skip
    assert out.returncode == 1, out.stderr
    assert out.stderr.startswith("p2v: error: cannot write frame 0 to ") and out.stderr.count("\n") == 1
    assert "Traceback" not in out.stderr
    # A P2V_TOKEN that is not UTF-8 is one line too.
    env = {os.fsencode(k): os.fsencode(v) for k, v in TOKEN_ENV.items()}
    env[b"P2V_TOKEN"] = b"abc\xff"
    out = subprocess.run(
        [sys.executable, "-m", "p2v_runtime.cli", "edit", str(clip), "--out", str(tmp_path / "out2"), "--prompt",
         "echo", "--quiet", "--server", running.address],
        cwd=ROOT,
        capture_output=True,
        timeout=120,
        env=env,
    )  # fmt: skip
    assert out.returncode == 1 and b"P2V_TOKEN is not UTF-8" in out.stderr and b"Traceback" not in out.stderr


# --- 6. slow but honest clients -------------------------------------------------------------------


def test_a_client_reading_slowly_but_steadily_gets_every_result(tmp_path, monkeypatch):
    """0.5 s read timeout, small kernel buffers, a 768 kB result read at about 400 kB/s (2 s)."""
    tune = P.tune_socket

    def small_buffers(sock):
        tune(sock)
        for option in (socket.SO_SNDBUF, socket.SO_RCVBUF):
            sock.setsockopt(socket.SOL_SOCKET, option, 32 * 1024)

    monkeypatch.setattr(P, "tune_socket", small_buffers)
    server = Server(HOST, 0, token=STRONG, job_runner=echo_job_runner, read_timeout=0.5, spool_dir=str(tmp_path))
    server.bind()
    serving = threading.Thread(target=server.serve_forever, daemon=True)
    serving.start()
    try:
        sock = socket.socket()
        small_buffers(sock)
        sock.settimeout(10)
        sock.connect(server.address)
        with sock:
            sock.sendall(hello_bytes(STRONG))
            assert P.read_message(sock).type == "hello_ok"
            width = height = 512
            frame = bytes(range(256)) * (width * height * 3 // 256)
            sock.sendall(P.pack({"type": "job", "settings": {"prompt": "echo"}, "frames": 1, "width": width,
                                 "height": height, "depth": False}))  # fmt: skip
            assert P.read_message(sock).type == "job_ok"
            sock.sendall(P.pack(P.frame_header("frame", 0, width, height), frame))
            data = bytearray()
            started = time.monotonic()
            while time.monotonic() - started < 20:
                chunk = sock.recv(16384)
                if not chunk:
                    break
                data += chunk
                if data.endswith(b"}") and b'"type":"done"' in data[-4096:]:
                    break
                time.sleep(len(chunk) / 400_000)
            messages, pos = [], 0
            while pos < len(data):
                message, used = P.decode(bytes(data[pos:]))
                messages.append(message)
                pos += used
        assert time.monotonic() - started > 1.0  # it did take longer than the read timeout
        kinds = [m.type for m in messages if m.type != "progress"]
        assert kinds == ["received", "result", "done"], kinds
        assert bytes(messages[[m.type for m in messages].index("result")].payload) == frame
    finally:
        server.stop()
        serving.join(10)


def test_a_client_that_stops_reading_is_dropped_and_the_log_says_why(start):
    running = start()
    width = height = 512
    with socket.create_connection((HOST, running.port), timeout=5) as sock:
        sock.sendall(hello_bytes(running.token))
        assert P.read_message(sock).type == "hello_ok"
        sock.sendall(P.pack({"type": "job", "settings": {"prompt": "echo", "depth_norm": "frame"}, "frames": 40,
                             "width": width, "height": height, "depth": False}))  # fmt: skip
        frame = bytes(width * height * 3)
        for index in range(40):  # never reads: results pile up in the socket buffers
            try:
                sock.sendall(P.pack(P.frame_header("frame", index, width, height), frame))
            except OSError:
                break
        deadline = time.monotonic() + 15
        while "stopped reading" not in running.stderr() and time.monotonic() < deadline:
            time.sleep(0.1)
    assert "stopped reading: nothing could be sent for 1 s" in running.stderr()
    assert "cannot be sent to" in running.stderr()  # the job's cancel says why too


# --- 2 and 7: one model however it is named, no upscaling (a real edit, tiny models) ---------------


@pytest.mark.slow
def test_one_model_folder_named_two_ways_loads_once_and_a_tiny_clip_is_not_upscaled(request, tmp_path):
    pytest.importorskip("p2v_runtime.editor")
    from p2v_runtime.settings import EditSettings

    models = request.getfixturevalue("tiny_models")
    np = pytest.importorskip("numpy")
    folder = str(models["sd2-depth"])
    link = tmp_path / "same-model"
    link.symlink_to(folder, target_is_directory=True)
    env = dict(TOKEN_ENV, P2V_TOKEN=STRONG, HF_HUB_OFFLINE="1")
    cmd = [sys.executable, "-m", "p2v_runtime.server", "--read-timeout", "60", "--spool-dir", str(tmp_path / "spool")]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env)
    try:
        address = json.loads(_readline_with_timeout(proc.stdout, 60))["address"]
        rng = np.random.default_rng(2)
        arrays = [rng.integers(0, 256, (2, 2, 3), dtype=np.uint8) for _ in range(2)]
        stats = []
        for model in (folder, str(link) + "/./"):  # the same folder, spelled through a symlink
            settings = EditSettings(
                prompt="a red car",
                source_prompt="a car",
                model=model,
                size=1024,
                steps=1,
                device="cpu",
                dtype="fp32",
                cache_dir=str(tmp_path / "cache"),
            )
            remote = edit_on_server(address, _Frames(arrays), settings, token=STRONG)
            edited = list(remote)
            assert [image.shape for _, image in edited] == [(2, 2, 3)] * 2
            stats.append(remote.stats)
        with Client.connect(address, STRONG) as client:
            client.shutdown(STRONG)
        assert proc.wait(30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
    assert stats[0].model_load_seconds > 0 and stats[1].model_load_seconds == 0
    assert stats[0].working_size == stats[1].working_size == (64, 64)  # 2x2 at size 1024: no 1024x1024 edit


def test_working_size_never_passes_the_source_rounded_up_to_64():
    from p2v_runtime.frames import working_size

    assert working_size(2, 2, 1024) == (64, 64)
    assert working_size(300, 200, 512) == (320, 192)
    assert working_size(640, 480, 1024) == (640, 512)  # 640 is already a multiple of 64
    assert working_size(1920, 1080, 512) == (512, 320)  # larger sources are as before


# --- 8. the add-on's own runtime (no Blender needed for this part) --------------------------------


def _addon_runtime_process():
    sys.path.insert(0, str(ROOT / "scripts"))
    try:
        import build_addon
    finally:
        sys.path.pop(0)
    build_addon.vendor()  # the add-on's vendored protocol and client, as the build writes them
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    from blender_addon import runtime_process

    return runtime_process


def test_the_addons_local_runtime_listens_where_only_its_user_can_connect(tmp_path):
    rp = _addon_runtime_process()
    process = rp.RuntimeProcess(sys.executable, 60, str(tmp_path / "runtime.log"), serve_args=("--job-runner", "echo"))
    process.start()
    try:
        process.wait_ready(timeout=60)
        if UNIX:
            assert process.host.startswith("unix:") and process.port == 0
            path = Path(process.host[len("unix:") :])
            assert stat.S_IMODE(path.lstat().st_mode) == 0o600
            assert stat.S_IMODE(Path(process.socket_dir).stat().st_mode) == 0o700
        else:
            assert process.host == "127.0.0.1" and process.port > 0
        with rp.connect(rp.RuntimeConfig(), process) as client:
            assert client.ping() < 5
        # Reached "as a remote runtime" by its address, as the add-on's Remote settings would.
        config = rp.RuntimeConfig(mode="REMOTE", host=process.host, port=process.port, token=process.token)
        with rp.connect(config, None) as client:
            assert client.ping() < 5
        wrong = rp.RuntimeConfig(mode="REMOTE", host=process.host, port=process.port, token="wrong")
        with pytest.raises(Exception, match="refused the token"):
            rp.connect(wrong, None)
    finally:
        process.stop()
    assert not process.alive()
    if UNIX:
        assert not path.exists() and process.socket_dir is None


def test_the_addons_remote_settings_take_a_ca_certificate(start, certificates):
    rp = _addon_runtime_process()
    running = start("--tls-cert", str(certificates["server.pem"]), "--tls-key", str(certificates["server.key"]))
    config = rp.RuntimeConfig(mode="REMOTE", host=HOST, port=running.port, token=running.token)
    with pytest.raises(Exception, match="speaks TLS: set the CA certificate in the Pix2Video preferences"):
        rp.connect(config, None)
    config.tls_ca = str(certificates["ca.pem"])
    with rp.connect(config, None) as client:
        assert client.ping() < 5
    config.tls_ca = str(certificates["other-ca.pem"])
    with pytest.raises(Exception, match="does not vouch"):
        rp.connect(config, None)
