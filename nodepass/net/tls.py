"""TLS for tunnels and the master (SPEC §1 ``tls``, §4 pool TLS).

``tls=1`` makes a self-signed certificate in memory at start (nothing is
written to disk, so a fresh key every run); ``tls=2`` loads PEM files and
re-reads them at most once per ``NP_RELOAD_INTERVAL`` so a renewed
certificate is picked up without a restart.  Either way only TLS 1.3 is
offered, as Go NodePass does.

Clients (pool connections of a dual-end client) follow the code the server
announced: ``1`` encrypts without verifying (the operator compares the
fingerprints both ends log), ``2`` verifies chain and host name.
"""

from __future__ import annotations

import datetime
import hashlib
import ipaddress
from typing import Any, Optional, Union

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from OpenSSL import SSL, crypto
from twisted.internet import ssl
from twisted.internet.interfaces import IOpenSSLClientConnectionCreator
from zope.interface import implementer
from twisted.internet.ssl import TLSVersion

from nodepass.base.logs import UNENCRYPTED_LINE, NodeLog

TLS13_SUITES = b"TLS_AES_128_GCM_SHA256:TLS_AES_256_GCM_SHA384:TLS_CHACHA20_POLY1305_SHA256"

CertLike = Union[bytes, str, crypto.X509, x509.Certificate]


def generate_self_signed(common_name: str = "nodepass") -> tuple[bytes, bytes]:
    """A fresh self-signed certificate and its key, as PEM bytes.

    EC P-256 keeps generation instant and handshakes cheap; the certificate
    is valid for a year and names ``common_name`` (plus ``localhost`` and the
    loopback addresses) so tools that insist on a SAN still accept it.
    """
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    now = datetime.datetime.now(datetime.timezone.utc)
    sans: list[x509.GeneralName] = [x509.DNSName("localhost")]
    try:
        sans.insert(0, x509.IPAddress(ipaddress.ip_address(common_name)))
    except ValueError:
        if common_name != "localhost":
            sans.insert(0, x509.DNSName(common_name))
    sans += [x509.IPAddress(ipaddress.ip_address("127.0.0.1")), x509.IPAddress(ipaddress.ip_address("::1"))]
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=365))
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_pem = cert.public_bytes(serialization.Encoding.PEM)
    key_pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    return cert_pem, key_pem


def _der(cert: CertLike) -> bytes:
    if isinstance(cert, x509.Certificate):
        return cert.public_bytes(serialization.Encoding.DER)
    if isinstance(cert, crypto.X509):
        return crypto.dump_certificate(crypto.FILETYPE_ASN1, cert)
    if isinstance(cert, ssl.Certificate):
        return crypto.dump_certificate(crypto.FILETYPE_ASN1, cert.original)
    if isinstance(cert, str):
        cert = cert.encode("ascii")
    if isinstance(cert, bytes):
        if cert.lstrip().startswith(b"-----"):
            return x509.load_pem_x509_certificate(cert).public_bytes(serialization.Encoding.DER)
        return cert  # already DER
    raise TypeError(f"not a certificate: {type(cert).__name__}")


def fingerprint(cert: CertLike) -> str:
    """``sha256:AB:CD:...``: SHA-256 of the DER certificate, uppercase hex
    pairs -- the form both tunnel ends log so operators can compare them."""
    digest = hashlib.sha256(_der(cert)).hexdigest().upper()
    return "sha256:" + ":".join(digest[i : i + 2] for i in range(0, len(digest), 2))


def _server_options(cert_pem: bytes, key_pem: bytes) -> ssl.CertificateOptions:
    certs = x509.load_pem_x509_certificates(cert_pem)
    leaf = crypto.X509.from_cryptography(certs[0])
    chain = [crypto.X509.from_cryptography(c) for c in certs[1:]]
    pkey = crypto.load_privatekey(crypto.FILETYPE_PEM, key_pem)
    check = SSL.Context(SSL.TLS_METHOD)
    check.use_certificate(leaf)
    check.use_privatekey(pkey)
    check.check_privatekey()  # raises when the key does not match
    options = ssl.CertificateOptions(
        privateKey=pkey,
        certificate=leaf,
        extraCertChain=chain or None,
        raiseMinimumTo=TLSVersion.TLSv1_3,
        # TLS 1.3 session tickets: a client opening many pool connections
        # resumes instead of repeating the certificate exchange.
        enableSessionTickets=True,
    )
    # AES-128-GCM first, as Go's TLS stack orders them on AES hardware: the
    # cheapest of the three for bulk relaying, and what Go peers pick.
    try:
        options.getContext().set_tls13_ciphersuites(TLS13_SUITES)
    except (AttributeError, SSL.Error):
        pass  # older pyOpenSSL/OpenSSL: keep the library's order
    return options


class ServerCredentials:
    """The certificate a server (or master) presents, and its TLS code.

    Build with :meth:`from_config`; ``tls_code`` is the *effective* code
    (``2`` degrades to ``1`` when the files cannot be loaded), which is what
    the handshake announces to clients.
    """

    def __init__(
        self,
        tls_code: int,
        cert_pem: bytes = b"",
        key_pem: bytes = b"",
        crt_path: str = "",
        key_path: str = "",
        log: Optional[NodeLog] = None,
        reload_interval: float = 3600.0,
        clock=None,
    ):
        self.tls_code = tls_code
        self.crt_path = crt_path
        self.key_path = key_path
        self.log = log or NodeLog("none")
        self.reload_interval = reload_interval
        self.clock = clock
        self._cert_pem = cert_pem
        self._key_pem = key_pem
        self._options: Optional[ssl.CertificateOptions] = None
        self._quic_cache: Optional[tuple] = None  # (cert PEM, QUIC material) of the last load
        self._loaded_at = clock.seconds() if clock is not None else 0.0
        self.fingerprint = ""
        if tls_code:
            self._options = _server_options(cert_pem, key_pem)
            self.fingerprint = fingerprint(cert_pem)

    @staticmethod
    def _read(crt: str, key: str) -> tuple[bytes, bytes]:
        with open(crt, "rb") as f:
            cert_pem = f.read()
        with open(key, "rb") as f:
            key_pem = f.read()
        _server_options(cert_pem, key_pem)  # raises when they do not load or match
        return cert_pem, key_pem

    @classmethod
    def from_config(
        cls,
        tls: int,
        crt: str,
        key: str,
        log: NodeLog,
        reload_interval: float,
        clock,
        common_name: str = "nodepass",
    ) -> "ServerCredentials":
        if tls == 0:
            return cls(0, log=log, reload_interval=reload_interval, clock=clock)
        if tls == 2:
            try:
                cert_pem, key_pem = cls._read(crt, key)
            except Exception as e:  # noqa: BLE001 - any load failure means fallback
                log.error("TLS certificate load failed (crt=%s key=%s): %s; falling back to tls=1", crt, key, _why(e))
            else:
                return cls(2, cert_pem, key_pem, crt, key, log, reload_interval, clock)
        cert_pem, key_pem = generate_self_signed(common_name)
        return cls(1, cert_pem, key_pem, log=log, reload_interval=reload_interval, clock=clock)

    @property
    def cert_pem(self) -> bytes:
        return self._cert_pem

    def code_line(self, quic: bool = False, stream_pool: bool = False) -> tuple[str, str]:
        """Go's start-up line for the effective TLS code, as ``(level,
        text)``: operators and dashboards read it (``TLS code-0:
        unencrypted`` is a warning).  ``quic``: the 1.12 QUIC pool;
        ``stream_pool``: a 1.14 QUIC or HTTP/2 pool (SPEC-1.14 §7)."""
        if self.tls_code == 0:
            return UNENCRYPTED_LINE
        if self.tls_code == 1:
            suffix = " for stream pool" if stream_pool else " for QUIC" if quic else ""
            return "info", "TLS code-1: RAM cert with TLS 1.3" + suffix
        try:
            cert = x509.load_pem_x509_certificate(self._cert_pem)
            names = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
        except ValueError:
            return "warn", "TLS code-2: unknown cert name with TLS 1.3"
        name = names[0].value if names else ""
        return "info", "TLS code-2: " + str(name) + " with TLS 1.3"

    def _maybe_reload(self) -> None:
        if self.tls_code != 2 or self.clock is None:
            return
        now = self.clock.seconds()
        if now - self._loaded_at < self.reload_interval:
            return
        self._loaded_at = now
        try:
            cert_pem, key_pem = self._read(self.crt_path, self.key_path)
        except Exception as e:  # noqa: BLE001 - keep serving the old certificate
            self.log.error("TLS certificate reload failed, keeping the current one: %s", _why(e))
            return
        if cert_pem != self._cert_pem or key_pem != self._key_pem:
            self._cert_pem, self._key_pem = cert_pem, key_pem
            self._options = _server_options(cert_pem, key_pem)
            self.fingerprint = fingerprint(cert_pem)
            self.log.info("TLS certificate reloaded: %s", self.fingerprint)

    def quic_material(self) -> tuple:
        """``(certificate, chain, private_key)`` as cryptography objects, for
        a new QUIC pool connection (reloaded like the TCP context)."""
        if not self.tls_code:
            raise ValueError("plain server (tls=0) has no certificate")
        self._maybe_reload()
        cached = self._quic_cache
        if cached is None or cached[0] is not self._cert_pem:
            certs = x509.load_pem_x509_certificates(self._cert_pem)
            key = serialization.load_pem_private_key(self._key_pem, password=None)
            cached = (self._cert_pem, (certs[0], certs[1:], key))
            self._quic_cache = cached
        return cached[1]

    def context_factory(self) -> ssl.CertificateOptions:
        """The server context factory to hand to ``startTLS``/``listenSSL``."""
        if not self.tls_code:
            raise ValueError("plain server (tls=0) has no TLS context")
        self._maybe_reload()
        assert self._options is not None
        return self._options


def _why(e: BaseException) -> str:
    text = str(e) or type(e).__name__
    return text


def handshake_tls_options(hostname: str) -> Any:
    """HTTPS for a 1.14 handshake on port 443 (SPEC-1.14 §1): the system
    roots (``SSL_CERT_FILE``/``SSL_CERT_DIR`` apply) and the tunnel host's
    name, for a TLS-terminating proxy or CDN in front of the server."""
    return ssl.optionsForClientTLS(hostname)


def client_context_factory(tls_code: int, hostname: str, trust_roots=None):
    """Context for a client's pool connections (SPEC §4).

    ``1``: TLS 1.3, no verification.  ``2``: verify the chain against the
    system roots (or ``trust_roots``: an ``ssl.Certificate``, PEM bytes, a
    list of those, or any ``IOpenSSLTrustRoot``) and the host name with
    service_identity; a failure aborts the TLS handshake.
    """
    if tls_code == 1:
        return ssl.CertificateOptions(verify=False, raiseMinimumTo=TLSVersion.TLSv1_3)
    if tls_code != 2:
        raise ValueError(f"no client TLS for code {tls_code}")
    root = trust_roots
    if root is None:
        root = ssl.platformTrust()
    elif isinstance(root, (bytes, str)):
        pem = root.encode("ascii") if isinstance(root, str) else root  # as pyOpenSSL encodes text
        root = ssl.trustRootFromCertificates([ssl.Certificate.loadPEM(pem)])
    elif isinstance(root, ssl.Certificate):
        root = ssl.trustRootFromCertificates([root])
    elif isinstance(root, (list, tuple)):
        root = ssl.trustRootFromCertificates(
            [c if isinstance(c, ssl.Certificate) else ssl.Certificate.loadPEM(c) for c in root]
        )
    return ssl.optionsForClientTLS(
        hostname,
        trustRoot=root,
        extraCertificateOptions={"raiseMinimumTo": TLSVersion.TLSv1_3},
    )


@implementer(IOpenSSLClientConnectionCreator)
class ResumingClient:
    """Wraps a client context (from :func:`client_context_factory`) so that
    new connections resume the last TLS session the server issued a ticket
    for.  A pool opens many short-lived connections to one server; resuming
    skips the certificate exchange and its signature checks (the resumed
    session keeps the verified peer certificate, so ``tls=2`` checks still
    hold: a session only exists after a verified handshake)."""

    def __init__(self, inner):
        self.inner = inner
        self.session = None

    def clientConnectionForTLS(self, tls_protocol) -> SSL.Connection:
        if IOpenSSLClientConnectionCreator.providedBy(self.inner):
            conn = self.inner.clientConnectionForTLS(tls_protocol)
        else:
            conn = SSL.Connection(self.inner.getContext(), None)
        if self.session is not None:
            conn.set_session(self.session)
        return conn

    def remember(self, tls_transport) -> None:
        """Keep the session of an established connection for the next."""
        try:
            session = tls_transport.getHandle().get_session()
        except Exception:  # noqa: BLE001 - no session: nothing to resume
            return
        if session is not None:
            self.session = session


class TLSVerificationFailed(Exception):
    """A ``tls=2`` client refused the server's certificate; the message
    says why in words (see :func:`explain_verification_failure`)."""


def certificate_names(cert: x509.Certificate) -> list[str]:
    """The names a certificate is valid for: its DNS and IP subject
    alternative names, or its common name when it has none."""
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except (x509.ExtensionNotFound, ValueError):
        san = None
    if san is not None:
        names = list(san.get_values_for_type(x509.DNSName))
        names += [str(ip) for ip in san.get_values_for_type(x509.IPAddress)]
        if names:
            return names
    return [a.value for a in cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME) if isinstance(a.value, str)]


def _subject(name: x509.Name) -> str:
    cns = [a.value for a in name.get_attributes_for_oid(NameOID.COMMON_NAME) if isinstance(a.value, str)]
    return f"'{cns[0]}'" if cns else f"'{name.rfc4514_string()}'"


def is_verification_failure(error: object) -> bool:
    """Did the TLS stack refuse the peer's certificate (as opposed to a
    connection that broke during the handshake)?"""
    value = getattr(error, "value", error)
    text = _error_text(value).lower()
    if _is_name_mismatch(value) or "certificate verify failed" in text:
        return True
    # aioquic's own wording for chain and date failures
    return "certificate" in text and any(w in text for w in ("self-signed", "self signed", "issuer", "valid"))


def _error_text(value: object) -> str:
    """An exception's message without library reprs: pyOpenSSL's
    ``[('SSL routines', '', 'certificate verify failed')]`` becomes
    ``certificate verify failed``."""
    if isinstance(value, SSL.Error) and value.args and isinstance(value.args[0], list):
        reasons = [r[-1] for r in value.args[0] if isinstance(r, tuple) and r and r[-1]]
        if reasons:
            return "; ".join(str(r) for r in reasons)
    return str(value) or type(value).__name__


def _is_name_mismatch(error: object) -> bool:
    # service_identity raises VerificationError / CertificateError (TCP
    # pool); aioquic turns them into "hostname ... doesn't match ..."
    # (QUIC pool).
    value = getattr(error, "value", error)
    mod = type(value).__module__ or ""
    return mod.startswith("service_identity") or "doesn't match" in str(value)


def _as_cryptography(cert) -> Optional[x509.Certificate]:
    if isinstance(cert, x509.Certificate):
        return cert
    if isinstance(cert, crypto.X509):
        return cert.to_cryptography()
    return None


#: What to do about a certificate no trusted CA vouches for.
_TRUST_HINT = "set SSL_CERT_FILE to the server's CA bundle (a PEM file) on this host, or run the server with tls=1"


def explain_verification_failure(error: object, expected_host: str, chain=(), sni: bool = False) -> str:
    """Why a ``tls=2`` client refused the server's certificate, in words an
    operator can act on -- not a library's repr.

    ``error`` is what the TLS stack raised (a Failure is fine);
    ``expected_host`` the host of the client URL; ``chain`` the
    certificates the server sent, leaf first (pyOpenSSL or cryptography),
    when they are still known.  Host name mismatches name the expected
    host and the names the certificate has; chain failures say whether the
    certificate is expired, self-signed or issued by an unknown CA, and how
    to trust it."""
    certs = [c for c in (_as_cryptography(x) for x in chain or ()) if c is not None]
    leaf = certs[0] if certs else None
    value = getattr(error, "value", error)
    if _is_name_mismatch(value) and sni:
        # 1.14 checks the sni= name (SPEC-1.14 §4.6), "none" for an IP host.
        names = ", ".join(certificate_names(leaf)) if leaf is not None else "other names"
        return (
            f"the server certificate is not valid for the name {expected_host} that this client checks "
            f"(it names: {names}); set sni= in the client URL to one of those names "
            "(without sni= an IP tunnel host checks the name none)"
        )
    if _is_name_mismatch(value):
        kind = "IP address" if _is_ip(expected_host) else "host name"
        names = ", ".join(certificate_names(leaf)) if leaf is not None else "other names"
        return (
            f"the server certificate is not valid for the {kind} {expected_host} that this client dials "
            f"(it names: {names}); use one of those names in the client URL, "
            f"or give the server a certificate that names {expected_host}"
        )
    if leaf is not None:
        now = datetime.datetime.now(datetime.timezone.utc)
        if now > leaf.not_valid_after_utc:
            when = f"{leaf.not_valid_after_utc:%Y-%m-%d %H:%M} UTC"
            return f"the server certificate expired on {when}; renew it on the server"
        if now < leaf.not_valid_before_utc:
            return (
                f"the server certificate is not valid before {leaf.not_valid_before_utc:%Y-%m-%d %H:%M} UTC "
                "(check the clocks of both hosts)"
            )
        if leaf.issuer == leaf.subject:
            return f"the server certificate {_subject(leaf.subject)} is self-signed and not trusted here: {_TRUST_HINT}"
        return (
            f"the server certificate is issued by {_subject(leaf.issuer)}, a CA this host does not trust "
            f"(or the server does not send its intermediate certificates): {_TRUST_HINT}"
        )
    return f"the server certificate could not be verified ({_error_text(value)}): {_TRUST_HINT}"


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        return False
    return True


def peer_certificate_chain(transport) -> list:
    """The certificates the TLS peer sent (leaf first), also after a failed
    handshake; empty when unknown."""
    try:
        chain = transport.getHandle().get_peer_cert_chain()
    except Exception:  # noqa: BLE001 - no TLS connection, or already freed
        return []
    return list(chain or [])


def peer_certificate_fingerprint(transport) -> str:
    """Fingerprint of the certificate the TLS peer presented ('' if none)."""
    try:
        cert = transport.getPeerCertificate()
    except Exception:  # noqa: BLE001
        return ""
    if cert is None:
        return ""
    return fingerprint(cert)


def host_certificate_fingerprint(transport) -> str:
    """Fingerprint of our own certificate on a TLS transport ('' if none)."""
    try:
        cert = transport.getHandle().get_certificate()
    except Exception:  # noqa: BLE001
        return ""
    if cert is None:
        return ""
    return fingerprint(cert)
