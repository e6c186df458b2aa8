"""https for the hosts trick: a local CA, a server certificate it signs, trust helpers.

``tls init`` writes, in one directory::

    ca.pem          the CA certificate, the file a user installs as trusted
    ca-key.pem      its private key (mode 0600; kept when init runs again)
    server.pem      the server certificate for every hosts-trick name, then the CA
    server-key.pem  its private key (mode 0600; new each time init runs)
    bundle.pem      certifi's roots plus ca.pem, for REQUESTS_CA_BUNDLE / SSL_CERT_FILE

``serve`` loads the directory through :func:`server_context`, which refuses (one-line
:class:`TlsError`) a missing or unreadable file, an expired certificate or one that
ca.pem did not sign. Every failure here is a TlsError whose text is meant for stderr.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import logging
import os
import re
import secrets
import socket
import ssl
import subprocess
import tempfile
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

log = logging.getLogger("compat_server.tls")

CA_CERT = "ca.pem"
CA_KEY = "ca-key.pem"
SERVER_CERT = "server.pem"
SERVER_KEY = "server-key.pem"
BUNDLE = "bundle.pem"

# Every name in hosts.example (a test keeps the two equal); the file is not installed
# with the package, so the list lives here too.
HOSTS_TRICK_NAMES = (
    "sms-activate.org",
    "api.sms-activate.org",
    "sms-activate.ru",
    "api.sms-activate.ru",
    "sms-activate.io",
    "api.sms-activate.io",
    "api.sms-activate.ae",
    "api.sms-activate.guru",
    "api.sms-activate.page",
    "sms-activate.world",
    "hero-sms.com",
    "api.grizzlysms.com",
    "smsbower.page",
    "smshub.org",
    "tiger-sms.com",
    "api.tiger-sms.com",
)
# so `curl --cacert ca.pem https://127.0.0.1/...` checks the server without a hosts entry
LOCAL_NAMES = ("localhost", "127.0.0.1", "::1")

CA_DAYS = 3650
# Apple refuses TLS server certificates valid for more than 825 days, whoever signed them
SERVER_DAYS = 825
RENEW_WARNING = dt.timedelta(days=30)  # serve warns this long before expiry
KEY_BITS = 2048  # RSA: the one key type every TLS stack a user may run accepts

_HOSTNAME = re.compile(
    r"(?=.{1,253}$)([a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?\.)*[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?"
)
_MARK_BEGIN = "# sms-compat local CA"
_MARK_END = "# end of sms-compat local CA"
_BLOCK = re.compile(
    rf"{re.escape(_MARK_BEGIN)} [^\n]*\n.*?{re.escape(_MARK_END)}\n", re.DOTALL
)


class TlsError(Exception):
    """A TLS setup problem, worded as one line for the operator."""


@dataclass(frozen=True)
class Issued:
    """What :func:`init` did."""

    directory: Path
    ca_created: bool
    names: tuple[str, ...]
    not_after: dt.datetime
    bundle: bool  # whether bundle.pem was written (needs certifi)


def init(
    directory: str | os.PathLike[str],
    hosts: Sequence[str] = (),
    *,
    now: dt.datetime | None = None,
) -> Issued:
    """Create the CA if ``directory`` has none (else keep it) and issue a new server
    certificate for every hosts-trick name plus ``hosts``; TlsError on any problem."""
    folder = Path(directory)
    now = now or dt.datetime.now(dt.timezone.utc)
    names = _names(hosts)
    if folder.exists() and not folder.is_dir():
        raise TlsError(f"{folder} is not a directory")
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise TlsError(f"cannot create {folder} ({_reason(exc)})") from None
    ca_cert_path, ca_key_path = folder / CA_CERT, folder / CA_KEY
    if ca_cert_path.exists() != ca_key_path.exists():
        present, absent = (
            (ca_cert_path, ca_key_path)
            if ca_cert_path.exists()
            else (ca_key_path, ca_cert_path)
        )
        raise TlsError(
            f"{present} exists but {absent} does not: restore it, or remove {present}"
            " to make a new CA (clients must then trust the new ca.pem)"
        )
    created = not ca_cert_path.exists()
    if created:
        ca_key = rsa.generate_private_key(public_exponent=65537, key_size=KEY_BITS)
        ca_cert = _make_ca(ca_key, now)
        _write(ca_key_path, _key_pem(ca_key), private=True)
        _write(ca_cert_path, ca_cert.public_bytes(serialization.Encoding.PEM))
    else:
        ca_cert = _load_cert(ca_cert_path)
        ca_key = _load_key(ca_key_path)
        if not _same_key(ca_key, ca_cert):
            raise TlsError(f"{ca_key_path} is not the key of {ca_cert_path}")
        _check_ca(ca_cert, ca_cert_path, now)
    server_key = rsa.generate_private_key(public_exponent=65537, key_size=KEY_BITS)
    server_cert = _make_server(server_key, ca_cert, ca_key, names, now)
    ca_pem = ca_cert.public_bytes(serialization.Encoding.PEM)
    _write(folder / SERVER_KEY, _key_pem(server_key), private=True)
    _write(
        folder / SERVER_CERT,
        server_cert.public_bytes(serialization.Encoding.PEM) + ca_pem,
    )
    roots = _certifi_roots()
    if roots is not None:
        _write(folder / BUNDLE, roots.rstrip(b"\n") + b"\n" + _marked(ca_cert, ca_pem))
    return Issued(
        folder, created, names, server_cert.not_valid_after_utc, roots is not None
    )


def server_context(
    directory: str | os.PathLike[str], *, now: dt.datetime | None = None
) -> ssl.SSLContext:
    """The TLS context ``serve`` listens with, after checking the directory's files."""
    folder = Path(directory)
    now = now or dt.datetime.now(dt.timezone.utc)
    if not folder.exists():
        raise TlsError(
            f"{folder} does not exist: create it with `sms-compat tls init --dir {folder}`"
        )
    if not folder.is_dir():
        raise TlsError(f"{folder} is not a directory")
    ca_cert = _load_cert(folder / CA_CERT)
    chain = _load_certs(folder / SERVER_CERT)
    server_cert = chain[0]
    try:
        server_cert.verify_directly_issued_by(ca_cert)
    except (ValueError, TypeError, InvalidSignature):
        raise TlsError(
            f"{folder / SERVER_CERT} was not issued by {folder / CA_CERT}: re-issue it"
            f" with `sms-compat tls init --dir {folder}`"
        ) from None
    _check_validity(server_cert, folder / SERVER_CERT, now, folder)
    if server_cert.not_valid_after_utc - now < RENEW_WARNING:
        log.warning(
            "%s expires on %s: re-issue it with `sms-compat tls init --dir %s`",
            folder / SERVER_CERT,
            f"{server_cert.not_valid_after_utc:%Y-%m-%d %H:%M} UTC",
            folder,
        )
    _check_ca(ca_cert, folder / CA_CERT, now)
    key = _load_key(folder / SERVER_KEY)
    if not _same_key(key, server_cert):
        raise TlsError(
            f"{folder / SERVER_KEY} is not the key of {folder / SERVER_CERT}"
        )
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.set_alpn_protocols(["http/1.1"])
    try:
        context.load_cert_chain(folder / SERVER_CERT, folder / SERVER_KEY)
    except (OSError, ssl.SSLError) as exc:
        raise TlsError(
            f"{folder}: cannot load the certificate ({_reason(exc)})"
        ) from None
    return context


def certificate_names(directory: str | os.PathLike[str]) -> tuple[str, ...]:
    """The DNS names and addresses server.pem in ``directory`` is valid for."""
    cert = _load_certs(Path(directory) / SERVER_CERT)[0]
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    return tuple(
        [str(name) for name in san.get_values_for_type(x509.DNSName)]
        + [str(ip) for ip in san.get_values_for_type(x509.IPAddress)]
    )


# ---- trust-python ---------------------------------------------------------------------


def certifi_bundle(python: str) -> Path:
    """Where the interpreter ``python`` reads its certifi bundle from."""
    try:
        done = subprocess.run(
            [python, "-c", "import certifi; print(certifi.where())"],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
    except OSError as exc:
        raise TlsError(f"cannot run {python} ({_reason(exc)})") from None
    except subprocess.TimeoutExpired:
        raise TlsError(f"{python} did not answer within 60 s") from None
    if done.returncode != 0:
        last = (done.stderr.strip().splitlines() or ["no output"])[-1]
        raise TlsError(f"{python} cannot import certifi ({last})")
    path = Path(done.stdout.strip())
    if path.name != "cacert.pem" or path.parent.name != "certifi" or path.is_symlink():
        raise TlsError(
            f"{python} reads {path}, not a certifi package's own file (likely the"
            " system store): trust ca.pem system-wide instead (see the README)"
        )
    return path


def trust_python(
    python: str, directory: str | os.PathLike[str] | None, *, undo: bool = False
) -> str:
    """Add ca.pem of ``directory`` to the certifi bundle of ``python`` (once), or with
    ``undo`` remove every CA this command added; returns what was done, in one line."""
    if undo:
        return _untrust(certifi_bundle(python))
    if directory is None:
        raise TlsError("--dir DIR is required (the directory of `tls init`)")
    ca_path = Path(directory) / CA_CERT
    ca_cert = _load_cert(ca_path)
    _check_ca(ca_cert, ca_path, dt.datetime.now(dt.timezone.utc))
    bundle = certifi_bundle(python)
    text = _read_bundle(bundle)
    if _fingerprint(ca_cert) in text:
        return f"{bundle} already trusts {ca_path}"
    block = _marked(ca_cert, ca_cert.public_bytes(serialization.Encoding.PEM))
    _rewrite(bundle, text.rstrip("\n") + "\n" + block.decode())
    return f"{bundle} now trusts {ca_path} (undo: sms-compat tls trust-python {python} --undo)"


def _untrust(bundle: Path) -> str:
    kept, count = _BLOCK.subn("", _read_bundle(bundle))
    if not count:
        return f"{bundle} holds no CA added by sms-compat: nothing to undo"
    _rewrite(bundle, kept)
    return f"removed the sms-compat CA from {bundle}"


# ---- building -------------------------------------------------------------------------


def _names(hosts: Iterable[str]) -> tuple[str, ...]:
    names: list[str] = []
    for raw in (*HOSTS_TRICK_NAMES, *LOCAL_NAMES, *hosts):
        name = raw.strip().lower().rstrip(".")
        if not _is_ip(name) and not _HOSTNAME.fullmatch(name):
            raise TlsError(f"--host {raw!r}: not a host name or IP address")
        if name not in names:
            names.append(name)
    return tuple(names)


def _is_ip(name: str) -> bool:
    try:
        ipaddress.ip_address(name)
    except ValueError:
        return False
    return True


def _make_ca(key: rsa.RSAPrivateKey, now: dt.datetime) -> x509.Certificate:
    name = x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "sms-compat"),
            x509.NameAttribute(
                NameOID.COMMON_NAME,
                f"sms-compat local CA {socket.gethostname()[:24]} {now:%Y-%m-%d}",
            ),
        ]
    )
    ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
    return (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(_serial())
        .not_valid_before(now - dt.timedelta(hours=1))
        .not_valid_after(now + dt.timedelta(days=CA_DAYS))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=False,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(ski, critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski),
            critical=False,
        )
        .sign(key, hashes.SHA256())
    )


def _make_server(
    key: rsa.RSAPrivateKey,
    ca_cert: x509.Certificate,
    ca_key: rsa.RSAPrivateKey,
    names: Sequence[str],
    now: dt.datetime,
) -> x509.Certificate:
    alt: list[x509.GeneralName] = [
        x509.IPAddress(ipaddress.ip_address(n)) if _is_ip(n) else x509.DNSName(n)
        for n in names
    ]
    ca_ski = ca_cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier)
    return (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, names[0])]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(_serial())
        .not_valid_before(now - dt.timedelta(hours=1))
        .not_valid_after(
            min(now + dt.timedelta(days=SERVER_DAYS), ca_cert.not_valid_after_utc)
        )
        .add_extension(x509.SubjectAlternativeName(alt), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=True,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(
            x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False
        )
        .add_extension(
            x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False
        )
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(
                ca_ski.value
            ),
            critical=False,
        )
        .sign(ca_key, hashes.SHA256())
    )


def _serial() -> int:
    return secrets.randbits(127) | 1  # positive, non-zero, unpredictable


def _key_pem(key: rsa.RSAPrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _same_key(key: rsa.RSAPrivateKey, cert: x509.Certificate) -> bool:
    spki = serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    return key.public_key().public_bytes(*spki) == cert.public_key().public_bytes(*spki)


def _fingerprint(cert: x509.Certificate) -> str:
    return cert.fingerprint(hashes.SHA256()).hex()


def _marked(cert: x509.Certificate, pem: bytes) -> bytes:
    """ca.pem between comment lines that let trust-python find (and undo) it."""
    head = f"{_MARK_BEGIN} sha256={_fingerprint(cert)}\n".encode()
    return head + pem + f"{_MARK_END}\n".encode()


def _certifi_roots() -> bytes | None:
    try:
        import certifi
    except ImportError:
        return None
    try:
        return Path(certifi.where()).read_bytes()
    except OSError:
        return None


# ---- checking -------------------------------------------------------------------------


def _check_ca(cert: x509.Certificate, path: Path, now: dt.datetime) -> None:
    try:
        constraints = cert.extensions.get_extension_for_class(x509.BasicConstraints)
    except x509.ExtensionNotFound:
        constraints = None
    if constraints is None or not constraints.value.ca:
        raise TlsError(f"{path} is not a CA certificate")
    if cert.not_valid_after_utc <= now:
        raise TlsError(
            f"{path} expired on {cert.not_valid_after_utc:%Y-%m-%d}: remove"
            f" {path.parent / CA_CERT} and {path.parent / CA_KEY}, run"
            f" `sms-compat tls init --dir {path.parent}` and trust the new ca.pem"
        )


def _check_validity(
    cert: x509.Certificate, path: Path, now: dt.datetime, folder: Path
) -> None:
    if cert.not_valid_after_utc <= now:
        raise TlsError(
            f"{path} expired on {cert.not_valid_after_utc:%Y-%m-%d %H:%M} UTC: re-issue"
            f" it with `sms-compat tls init --dir {folder}`"
        )
    if cert.not_valid_before_utc > now:
        raise TlsError(
            f"{path} is valid only from {cert.not_valid_before_utc:%Y-%m-%d %H:%M} UTC"
            " (is this machine's clock right?)"
        )


def _read(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise TlsError(
            f"{path} is missing: run `sms-compat tls init --dir {path.parent}`"
        ) from None
    except OSError as exc:
        raise TlsError(f"cannot read {path} ({_reason(exc)})") from None


def _load_certs(path: Path) -> list[x509.Certificate]:
    try:
        certs = x509.load_pem_x509_certificates(_read(path))
    except ValueError:
        raise TlsError(f"{path} is not a PEM certificate") from None
    return certs


def _load_cert(path: Path) -> x509.Certificate:
    return _load_certs(path)[0]


def _load_key(path: Path) -> rsa.RSAPrivateKey:
    try:
        key = serialization.load_pem_private_key(_read(path), password=None)
    except (ValueError, TypeError):
        raise TlsError(f"{path} is not an unencrypted PEM private key") from None
    if not isinstance(key, rsa.RSAPrivateKey):
        raise TlsError(f"{path} is not an RSA key (make it with `sms-compat tls init`)")
    return key


# ---- files ----------------------------------------------------------------------------


def _write(path: Path, data: bytes, *, private: bool = False) -> None:
    """Replace ``path`` atomically; a private file is 0600 from its first byte."""
    try:
        fd, temp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
        try:
            with os.fdopen(fd, "wb") as out:
                out.write(data)
            os.chmod(temp, 0o600 if private else 0o644)
            os.replace(temp, path)
        except BaseException:
            os.unlink(temp)
            raise
    except OSError as exc:
        raise TlsError(f"cannot write {path} ({_reason(exc)})") from None


def _read_bundle(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise TlsError(f"cannot read {path} ({_reason(exc)})") from None


def _rewrite(path: Path, text: str) -> None:
    """Replace a bundle atomically, keeping its mode."""
    mode = path.stat().st_mode & 0o777
    try:
        fd, temp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as out:
                out.write(text)
            os.chmod(temp, mode)
            os.replace(temp, path)
        except BaseException:
            os.unlink(temp)
            raise
    except OSError as exc:
        raise TlsError(
            f"cannot write {path} ({_reason(exc)}): run it as the user who owns"
            " that Python (sudo for a system one)"
        ) from None


def _reason(exc: BaseException) -> str:
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    return str(exc) or type(exc).__name__
