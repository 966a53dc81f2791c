// gopeer: a small dual-end tunnel peer written in Go from SPEC.md (§3-§5),
// for the interop tests in tests/test_gopeer.py.  It is not Go NodePass: it
// is an independent implementation of the same wire protocol on Go's own
// TLS stack (crypto/tls), so the Python server and client are checked
// against a peer that shares none of their code.
//
//	gopeer client -tunnel HOST:PORT -key KEY [-target HOST:PORT] [-entry HOST:PORT] [-pool N]
//	gopeer server -tunnel HOST:PORT -key KEY -flow -|+ -tls 0|1 [-quic] [-target ..] [-entry ..] [-max N]
//
// Built with ``-tags quic`` (quic.go, on quic-go) it also speaks the QUIC
// pool (pool type 1); without, it refuses that pool type.
//
// It prints one line per event the tests wait for: READY, VERIFIED <fp>,
// CERT <fp>, POOL <n>, and ERROR <text> before exiting non-zero.
package main

import (
	"bufio"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/sha256"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/base64"
	"encoding/hex"
	"flag"
	"fmt"
	"io"
	"math/big"
	"net"
	"net/url"
	"os"
	"strings"
	"sync"
	"time"
)

var out = struct {
	sync.Mutex
}{}

func say(format string, args ...interface{}) {
	out.Lock()
	defer out.Unlock()
	fmt.Printf(format+"\n", args...)
	os.Stdout.Sync()
}

func fail(format string, args ...interface{}) {
	say("ERROR "+format, args...)
	os.Exit(1)
}

// ---- line codec (SPEC §3.1) ----------------------------------------------

type codec struct{ key []byte }

func (c codec) xor(b []byte) []byte {
	r := make([]byte, len(b))
	for i := range b {
		r[i] = b[i] ^ c.key[i%len(c.key)]
	}
	return r
}

func (c codec) encode(payload string) []byte {
	return []byte(base64.StdEncoding.EncodeToString(c.xor([]byte(payload))) + "\n")
}

func (c codec) decode(line string) (string, error) {
	raw, err := base64.StdEncoding.DecodeString(strings.TrimRight(line, "\r\n"))
	if err != nil {
		return "", err
	}
	return string(c.xor(raw)), nil
}

// ---- pool (SPEC §4) ---------------------------------------------------------

type pool struct {
	mu    sync.Mutex
	cond  *sync.Cond
	idle  map[string]net.Conn
	order []string
}

func newPool() *pool {
	p := &pool{idle: map[string]net.Conn{}}
	p.cond = sync.NewCond(&p.mu)
	return p
}

func (p *pool) put(id string, c net.Conn) bool {
	p.mu.Lock()
	defer p.mu.Unlock()
	if _, dup := p.idle[id]; dup {
		return false
	}
	p.idle[id] = c
	p.order = append(p.order, id)
	p.cond.Broadcast()
	return true
}

func (p *pool) size() int {
	p.mu.Lock()
	defer p.mu.Unlock()
	return len(p.idle)
}

// wait runs pick under the lock until it succeeds or timeout passes.
func (p *pool) wait(timeout time.Duration, pick func() (string, net.Conn)) (string, net.Conn) {
	deadline := time.Now().Add(timeout)
	timer := time.AfterFunc(timeout, func() { p.mu.Lock(); p.cond.Broadcast(); p.mu.Unlock() })
	defer timer.Stop()
	p.mu.Lock()
	defer p.mu.Unlock()
	for {
		if id, c := pick(); c != nil {
			return id, c
		}
		if time.Now().After(deadline) {
			return "", nil
		}
		p.cond.Wait()
	}
}

func (p *pool) take(id string, timeout time.Duration) net.Conn {
	_, c := p.wait(timeout, func() (string, net.Conn) {
		c, ok := p.idle[id]
		if !ok {
			return "", nil
		}
		delete(p.idle, id)
		return id, c
	})
	return c
}

func (p *pool) any(timeout time.Duration) (string, net.Conn) {
	return p.wait(timeout, func() (string, net.Conn) {
		for len(p.order) > 0 {
			id := p.order[0]
			p.order = p.order[1:]
			if c, ok := p.idle[id]; ok {
				delete(p.idle, id)
				return id, c
			}
		}
		return "", nil
	})
}

// ---- QUIC pool hooks (set by quic.go when built with -tags quic) -----------

var quicDialPool func(p *peer, addr string, size int)
var quicServePool func(p *peer, addr string, tlsCfg *tls.Config, clientIP func() string, max int) error

// peerCert is the DER certificate the other end presented on a pool
// connection (a TLS connection, or a QUIC stream), or nil.
func peerCert(c net.Conn) []byte {
	if tc, ok := c.(*tls.Conn); ok {
		certs := tc.ConnectionState().PeerCertificates
		if len(certs) > 0 {
			return certs[0].Raw
		}
		return nil
	}
	if pc, ok := c.(interface{ PeerCertificate() []byte }); ok {
		return pc.PeerCertificate()
	}
	return nil
}

// ---- the peer -------------------------------------------------------------

type peer struct {
	codec  codec
	ctrl   net.Conn
	wmu    sync.Mutex
	pool   *pool
	target string
	entry  string
	flow   string
	role   string
}

func (p *peer) send(payload string) {
	p.wmu.Lock()
	defer p.wmu.Unlock()
	p.ctrl.Write(p.codec.encode(payload))
}

func fingerprint(der []byte) string {
	sum := sha256.Sum256(der)
	parts := make([]string, len(sum))
	for i, b := range sum {
		parts[i] = fmt.Sprintf("%02X", b)
	}
	return "sha256:" + strings.Join(parts, ":")
}

func relay(a, b net.Conn) {
	var once sync.Once
	closeBoth := func() { a.Close(); b.Close() }
	go func() { io.Copy(a, b); once.Do(closeBoth) }()
	io.Copy(b, a)
	once.Do(closeBoth)
}

// isEntry: the side that accepts user connections (SPEC §2).
func (p *peer) isEntry() bool {
	return (p.role == "server") == (p.flow == "-")
}

func (p *peer) controlLoop(r *bufio.Reader) {
	for {
		line, err := r.ReadString('\n')
		if err != nil {
			fail("control connection lost: %v", err)
		}
		payload, err := p.codec.decode(line)
		if err != nil {
			say("BADSIGNAL %q", line)
			continue
		}
		u, err := url.Parse(payload)
		if err != nil {
			say("BADSIGNAL %q", payload)
			continue
		}
		id := strings.TrimPrefix(u.Path, "/")
		switch u.Fragment {
		case "i":
			p.send("np:#o")
		case "o":
		case "f":
			say("FLUSH")
		case "1":
			go p.exitTCP(u.Host, id)
		case "2":
			go p.exitUDP(u.Host, id)
		case "v":
			go func() {
				c := p.pool.take(id, 5*time.Second)
				if c == nil {
					say("ERROR verify: no pool connection %s", id)
					return
				}
				if der := peerCert(c); der != nil {
					say("VERIFIED %s", fingerprint(der))
				}
				c.Close()
			}()
		default:
			say("SIGNAL %s", payload)
		}
	}
}

func (p *peer) exitTCP(origin, id string) {
	c := p.pool.take(id, 5*time.Second)
	if c == nil {
		say("ERROR launch %s: no pool connection %s", origin, id)
		return
	}
	t, err := net.Dial("tcp", p.target)
	if err != nil {
		c.Close()
		say("ERROR dial %s: %v", p.target, err)
		return
	}
	relay(c, t)
}

func (p *peer) exitUDP(origin, id string) {
	c := p.pool.take(id, 5*time.Second)
	if c == nil {
		say("ERROR udp launch %s: no pool connection %s", origin, id)
		return
	}
	t, err := net.Dial("udp", p.target)
	if err != nil {
		c.Close()
		return
	}
	go func() {
		buf := make([]byte, 65536)
		for {
			t.SetReadDeadline(time.Now().Add(10 * time.Second))
			n, err := t.Read(buf)
			if err != nil {
				c.Close()
				return
			}
			c.Write(buf[:n])
		}
	}()
	buf := make([]byte, 65536)
	for {
		n, err := c.Read(buf) // one read is one datagram (SPEC §5)
		if err != nil {
			t.Close()
			return
		}
		t.Write(buf[:n])
	}
}

func (p *peer) serveEntry() {
	ln, err := net.Listen("tcp", p.entry)
	if err != nil {
		fail("listen %s: %v", p.entry, err)
	}
	for {
		u, err := ln.Accept()
		if err != nil {
			return
		}
		go func(u net.Conn) {
			id, c := p.pool.any(5 * time.Second)
			if c == nil {
				u.Close()
				return
			}
			p.send(fmt.Sprintf("np://%s/%s#1", u.RemoteAddr().String(), url.PathEscape(id)))
			relay(u, c)
		}(u)
	}
}

// ---- client role ------------------------------------------------------------

func runClient(tunnel, key, target, entry string, poolSize int) {
	p := &peer{codec: codec{[]byte(key)}, pool: newPool(), target: target, entry: entry, role: "client"}
	ctrl, err := net.Dial("tcp", tunnel)
	if err != nil {
		fail("dial %s: %v", tunnel, err)
	}
	p.ctrl = ctrl
	ctrl.Write(p.codec.encode(key))
	r := bufio.NewReader(ctrl)
	ctrl.SetReadDeadline(time.Now().Add(5 * time.Second))
	line, err := r.ReadString('\n')
	if err != nil {
		fail("handshake: %v", err)
	}
	ctrl.SetReadDeadline(time.Time{})
	cfg, err := p.codec.decode(line)
	if err != nil {
		fail("handshake answer: %v", err)
	}
	u, err := url.Parse(cfg)
	if err != nil || u.Scheme != "np" || u.User == nil || u.Host == "" || u.Fragment == "" {
		fail("handshake answer %q", cfg)
	}
	p.flow = strings.TrimPrefix(u.Path, "/")
	tlsCode := u.Fragment
	say("CONFIG %s", cfg)
	if u.User.Username() == "1" {
		if quicDialPool == nil {
			fail("pool type 1 (QUIC): built without -tags quic")
		}
		quicDialPool(p, tunnel, poolSize)
		if p.isEntry() {
			go p.serveEntry()
		}
		say("READY")
		p.controlLoop(r)
		return
	}
	dial := func() (net.Conn, error) {
		if tlsCode == "0" {
			return net.Dial("tcp", tunnel)
		}
		return tls.Dial("tcp", tunnel, &tls.Config{InsecureSkipVerify: true, MinVersion: tls.VersionTLS13})
	}
	go func() { // keep poolSize idle connections
		for {
			for p.pool.size() < poolSize {
				c, err := dial()
				if err != nil {
					time.Sleep(100 * time.Millisecond)
					continue
				}
				c.SetReadDeadline(time.Now().Add(time.Minute))
				id := make([]byte, 4)
				if _, err := io.ReadFull(c, id); err != nil {
					c.Close()
					continue
				}
				c.SetReadDeadline(time.Time{})
				p.pool.put(hex.EncodeToString(id), c)
			}
			time.Sleep(20 * time.Millisecond)
		}
	}()
	if p.isEntry() {
		go p.serveEntry()
	}
	say("READY")
	p.controlLoop(r)
}

// ---- server role ------------------------------------------------------------

func selfSigned() (tls.Certificate, string) {
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		fail("key: %v", err)
	}
	tmpl := &x509.Certificate{
		SerialNumber: big.NewInt(time.Now().UnixNano()),
		Subject:      pkix.Name{CommonName: "gopeer"},
		NotBefore:    time.Now().Add(-time.Hour),
		NotAfter:     time.Now().Add(24 * time.Hour),
		DNSNames:     []string{"localhost"},
		IPAddresses:  []net.IP{net.ParseIP("127.0.0.1")},
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &key.PublicKey, key)
	if err != nil {
		fail("certificate: %v", err)
	}
	return tls.Certificate{Certificate: [][]byte{der}, PrivateKey: key}, fingerprint(der)
}

func runServer(tunnel, key, target, entry, flow, tlsCode string, max int, useQUIC bool) {
	poolType := "0"
	if useQUIC {
		poolType = "1"
		if tlsCode == "0" {
			tlsCode = "1" // QUIC always encrypts
		}
	}
	p := &peer{codec: codec{[]byte(key)}, pool: newPool(), target: target, entry: entry, flow: flow, role: "server"}
	ln, err := net.Listen("tcp", tunnel)
	if err != nil {
		fail("listen %s: %v", tunnel, err)
	}
	var tlsCfg *tls.Config
	var fp string
	if tlsCode != "0" {
		var cert tls.Certificate
		cert, fp = selfSigned()
		tlsCfg = &tls.Config{Certificates: []tls.Certificate{cert}, MinVersion: tls.VersionTLS13}
		say("CERT %s", fp)
	}
	verify := func() {
		// SPEC §3.3: once the pool is ready, name one pool connection in a
		// verify signal and log our own fingerprint.
		id, c := p.pool.any(10 * time.Second)
		if c == nil {
			return
		}
		p.send(fmt.Sprintf("np://%s/%s#v", p.ctrl.RemoteAddr().String(), url.PathEscape(id)))
		say("VERIFIED %s", fp)
		time.AfterFunc(2*time.Second, func() { c.Close() })
	}
	var clientIP string
	if useQUIC {
		if quicServePool == nil {
			fail("-quic: built without -tags quic")
		}
		if err := quicServePool(p, tunnel, tlsCfg, func() string { return clientIP }, max); err != nil {
			fail("QUIC listen %s: %v", tunnel, err)
		}
	}
	say("LISTENING")
	for {
		c, err := ln.Accept()
		if err != nil {
			fail("accept: %v", err)
		}
		ip := c.RemoteAddr().(*net.TCPAddr).IP.String()
		if p.ctrl == nil {
			r := bufio.NewReader(c)
			c.SetReadDeadline(time.Now().Add(5 * time.Second))
			line, err := r.ReadString('\n')
			if err == nil && strings.HasPrefix(line, "GET ") {
				// The 1.12 "what is my IP" probe (SPEC-1.14 §3.2.5 quotes the
				// answer): what a 1.14 client meets at a 1.12 server.
				for {
					h, herr := r.ReadString('\n')
					if herr != nil || h == "\r\n" || h == "\n" {
						break
					}
				}
				body := ip + "\n"
				fmt.Fprintf(c, "HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: %d\r\nConnection: close\r\n\r\n%s", len(body), body)
				say("PROBE %s", c.RemoteAddr())
				c.Close()
				continue
			}
			c.SetReadDeadline(time.Time{})
			got, derr := p.codec.decode(line)
			if err != nil || derr != nil || got != key {
				say("DENIED %s", c.RemoteAddr())
				c.Close()
				continue
			}
			clientIP = ip
			p.ctrl = c
			p.send(fmt.Sprintf("np://%s@%d/%s#%s", poolType, max, flow, tlsCode))
			if p.isEntry() {
				go p.serveEntry()
			}
			say("READY")
			if tlsCfg != nil {
				go verify()
			}
			go p.controlLoop(r)
			go func() {
				for range time.Tick(500 * time.Millisecond) {
					p.send("np:#i")
				}
			}()
			continue
		}
		if ip != clientIP || p.pool.size() >= max {
			c.Close()
			continue
		}
		go func(c net.Conn) {
			if tlsCfg != nil {
				tc := tls.Server(c, tlsCfg)
				tc.SetDeadline(time.Now().Add(5 * time.Second))
				if err := tc.Handshake(); err != nil {
					c.Close()
					return
				}
				tc.SetDeadline(time.Time{})
				c = tc
			}
			raw := make([]byte, 4)
			rand.Read(raw)
			if _, err := c.Write(raw); err != nil {
				c.Close()
				return
			}
			if !p.pool.put(hex.EncodeToString(raw), c) {
				c.Close()
			}
		}(c)
	}
}

func main() {
	if len(os.Args) < 2 {
		fail("usage: gopeer client|server [flags]")
	}
	fs := flag.NewFlagSet(os.Args[1], flag.ExitOnError)
	tunnel := fs.String("tunnel", "", "tunnel address")
	key := fs.String("key", "", "tunnel key")
	target := fs.String("target", "", "target address (exit side)")
	entry := fs.String("entry", "", "entry address (entry side)")
	poolSize := fs.Int("pool", 8, "client: idle pool connections to keep")
	flow := fs.String("flow", "-", "server: - (server receives) or + (server sends)")
	tlsCode := fs.String("tls", "1", "server: TLS code 0 or 1")
	max := fs.Int("max", 64, "server: largest pool")
	useQUIC := fs.Bool("quic", false, "server: QUIC pool (pool type 1)")
	fs.Parse(os.Args[2:])
	switch os.Args[1] {
	case "client":
		runClient(*tunnel, *key, *target, *entry, *poolSize)
	case "server":
		runServer(*tunnel, *key, *target, *entry, *flow, *tlsCode, *max, *useQUIC)
	default:
		fail("unknown role %q", os.Args[1])
	}
}
