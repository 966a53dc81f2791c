"""Errors a person can act on: a ``tls=2`` client that refuses the server's
certificate says why in words (which names, which CA, what to set), and a
host name that does not resolve is named.  Real services, real TLS with
certificates made here, ports chosen by the OS."""

from __future__ import annotations

import datetime
import os

from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from OpenSSL import SSL
from twisted.internet import reactor
from twisted.trial import unittest

from nodepass.net.tls import explain_verification_failure, generate_self_signed
from tests.helpers import connect, service_up, wait_for
from tests.test_hostile_tunnel import KEY, QUICK
from tests.test_tunnel import CAMixin, TunnelMixin, d, make_leaf

#: Library reprs that must not reach an operator.
REPRS = ("VerificationError(", "Mismatch(", "DNSPattern(", "IPAddressPattern(", "('SSL routines'")


class TLSRefusalTests(CAMixin, unittest.TestCase):
    """The client trusts the CA made in ``setUp`` through SSL_CERT_FILE."""

    async def refused(self, crt: str, key: str, host: str, query: str = "") -> str:
        """Start a tls=2 server with ``crt``/``key`` and a client dialling
        it as ``host``; returns the client's refusal line."""
        target, _ = self.echo_targets()
        query = f"log=debug&mode=2&tls=2&crt={crt}&key={key}{query}"
        server = self._service("server", f"server://{KEY}@127.0.0.1:0/127.0.0.1:{target}?{query}", QUICK)
        await service_up(server, "server", timeout=10)
        self.assertEqual(server.runner.tls_code, 2)
        url = f"client://{KEY}@{host}:{server.runner.tunnel_port_number}/127.0.0.3:{target}?mode=2&log=debug&min=2"
        self._service("client", url, QUICK)
        await wait_for(lambda: self.logged("client", "TLS verification of the server"), what="refusal line")
        line = [ln for ln in self.lines["client"] if "TLS verification of the server" in ln][0]
        for text in REPRS:
            self.assertNotIn(text, line)
        return line

    @d
    async def test_host_name_mismatch_names_both_sides(self):
        crt, key = make_leaf(self.dir, self.ca, self.ca_key, "other.example")
        line = await self.refused(crt, key, "localhost")
        # 1.14: the sni= name, by default the tunnel host when it is a name.
        self.assertIn("not valid for the name localhost that this client checks", line)
        self.assertIn("(it names: other.example)", line)

    @d
    async def test_ip_address_mismatch_names_both_sides(self):
        """1.12 checks the tunnel host (the server is pinned to 1.12; the
        client falls back)."""
        crt, key = make_leaf(self.dir, self.ca, self.ca_key, "localhost")
        line = await self.refused(crt, key, "127.0.0.1", "&wire=1.12")
        self.assertIn("not valid for the IP address 127.0.0.1", line)
        self.assertIn("(it names: localhost)", line)

    @d
    async def test_114_ip_host_says_set_sni(self):
        """1.14 checks the sni= name: ``none`` for an IP host without it."""
        crt, key = make_leaf(self.dir, self.ca, self.ca_key, "localhost")
        line = await self.refused(crt, key, "127.0.0.1")
        self.assertIn("not valid for the name none that this client checks", line)
        self.assertIn("(it names: localhost); set sni=", line)

    @d
    async def test_unknown_ca_says_set_ssl_cert_file(self):
        os.environ.pop("SSL_CERT_FILE")  # CAMixin restores it
        crt, key = make_leaf(self.dir, self.ca, self.ca_key, "localhost")
        line = await self.refused(crt, key, "localhost")
        self.assertIn("issued by 'nodepass test CA', a CA this host does not trust", line)
        self.assertIn("set SSL_CERT_FILE to the server's CA bundle", line)

    @d
    async def test_self_signed_says_set_ssl_cert_file(self):
        cert_pem, key_pem = generate_self_signed("localhost")
        crt, key = os.path.join(self.dir, "self.crt"), os.path.join(self.dir, "self.key")
        for path, data in ((crt, cert_pem), (key, key_pem)):
            with open(path, "wb") as f:
                f.write(data)
        line = await self.refused(crt, key, "localhost")
        self.assertIn("the server certificate 'localhost' is self-signed", line)
        self.assertIn("set SSL_CERT_FILE to the server's CA bundle", line)

    @d
    async def test_quic_host_name_mismatch_names_both_sides(self):
        crt, key = make_leaf(self.dir, self.ca, self.ca_key, "other.example")
        line = await self.refused(crt, key, "localhost", "&quic=1")
        self.assertIn("not valid for the host name localhost", line)
        self.assertIn("(it names: other.example)", line)


class ExplainTests(unittest.TestCase):
    def test_expired_certificate(self):
        key = ec.generate_private_key(ec.SECP256R1())
        name = x509.Name([x509.NameAttribute(x509.NameOID.COMMON_NAME, "old")])
        when = datetime.datetime(2020, 1, 2, 3, 4, tzinfo=datetime.timezone.utc)
        cert = (
            x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(1).not_valid_before(when - datetime.timedelta(days=1)).not_valid_after(when)
            .sign(key, hashes.SHA256())
        )
        error = SSL.Error([("SSL routines", "", "certificate verify failed")])
        text = explain_verification_failure(error, "old", [cert])
        self.assertEqual(text, "the server certificate expired on 2020-01-02 03:04 UTC; renew it on the server")


class UnresolvedHostTests(TunnelMixin, unittest.TestCase):
    @d
    async def test_client_names_the_server_host(self):
        self._service("client", f"client://{KEY}@nonexistent.invalid:9/127.0.0.3:10?mode=2&log=debug", QUICK)
        await wait_for(lambda: self.logged("client", "Client error:"), what="client error")
        self.assertTrue(self.logged(
            "client", "Client error: cannot reach the server at nonexistent.invalid:9: "
            "cannot resolve host name nonexistent.invalid:"
        ))
        self.assertFalse(self.logged("client", "[Errno"))

    @d
    async def test_single_end_names_the_target_host(self):
        svc = self._service("single", "client://127.0.0.1:0/nonexistent.invalid:80?mode=1&log=debug", QUICK)
        await service_up(svc, "single", timeout=10)
        user = await connect(svc.runner.tcp_port.getHost().port)
        await user.lost.addTimeout(5, reactor)
        await wait_for(lambda: self.logged("single", "dropped:"), what="drop line")
        self.assertTrue(self.logged("single", "last error: cannot resolve host name nonexistent.invalid:"))
        self.assertFalse(self.logged("single", "[Errno"))


class InvalidTLSTests(unittest.TestCase):
    """An invalid ``tls=`` gives plaintext (as Go does): that is logged at
    ERROR, naming the fallback, not as a quiet warning."""

    @d
    async def test_invalid_tls_is_an_error_naming_plaintext(self):
        from nodepass.config.urls import parse_url
        from nodepass.service.instance import TunnelService
        from nodepass.base.logs import NodeLog

        config = parse_url("server://127.0.0.1:0/127.0.0.1:9?mode=2&tls=bogus&log=debug")
        log = NodeLog(config.log)
        seen: list[tuple[str, str]] = []
        log.listeners.append(lambda level, line: seen.append((level, line)))
        svc = TunnelService(config, tunables=QUICK, log=log)
        svc.startService()
        self.addCleanup(svc.stopService)
        await service_up(svc, "server")
        self.assertEqual(svc.runner.tls_code, 0)
        errors = [line for level, line in seen if level == "ERROR" and "tls=" in line]
        self.assertEqual(len(errors), 1, seen)
        self.assertIn("Invalid tls='bogus'", errors[0])
        self.assertIn("using tls=0: traffic is NOT encrypted", errors[0])

    def test_client_ignores_tls(self):
        from nodepass.config.urls import parse_url

        self.assertEqual(parse_url("client://127.0.0.1:1/127.0.0.1:2?tls=bogus").errors, ())
