//go:build quic

// QUIC pool (SPEC §4, pool type 1) for gopeer, on quic-go: streams of QUIC
// connections to the tunnel's UDP port, ALPN np-quic; the client writes one
// byte on a new stream, the server answers the 4-byte pool ID.
package main

import (
	"context"
	"crypto/rand"
	"crypto/tls"
	"encoding/hex"
	"io"
	"net"
	"time"

	quic "github.com/lucas-clemente/quic-go"
)

type streamConn struct {
	quic.Stream
	conn quic.Connection
}

func (s streamConn) LocalAddr() net.Addr  { return s.conn.LocalAddr() }
func (s streamConn) RemoteAddr() net.Addr { return s.conn.RemoteAddr() }

func (s streamConn) PeerCertificate() []byte {
	certs := s.conn.ConnectionState().TLS.PeerCertificates
	if len(certs) == 0 {
		return nil
	}
	return certs[0].Raw
}

func quicConfig() *quic.Config {
	return &quic.Config{KeepAlivePeriod: time.Second, MaxIdleTimeout: 3 * time.Second, MaxIncomingStreams: 128}
}

func init() {
	quicDialPool = func(p *peer, addr string, size int) {
		tlsCfg := &tls.Config{InsecureSkipVerify: true, NextProtos: []string{"np-quic"}, MinVersion: tls.VersionTLS13}
		go func() {
			var conn quic.Connection
			for {
				if conn == nil || conn.Context().Err() != nil {
					c, err := quic.DialAddr(addr, tlsCfg, quicConfig())
					if err != nil {
						say("QUICERR %v", err)
						time.Sleep(200 * time.Millisecond)
						continue
					}
					conn = c
					say("QUIC %s", c.ConnectionState().TLS.NegotiatedProtocol)
				}
				for p.pool.size() < size {
					st, err := conn.OpenStreamSync(context.Background())
					if err != nil {
						break
					}
					st.Write([]byte{0})
					st.SetReadDeadline(time.Now().Add(time.Minute))
					id := make([]byte, 4)
					if _, err := io.ReadFull(st, id); err != nil {
						st.Close()
						break
					}
					st.SetReadDeadline(time.Time{})
					p.pool.put(hex.EncodeToString(id), streamConn{st, conn})
				}
				time.Sleep(20 * time.Millisecond)
			}
		}()
	}

	quicServePool = func(p *peer, addr string, tlsCfg *tls.Config, clientIP func() string, max int) error {
		cfg := tlsCfg.Clone()
		cfg.NextProtos = []string{"np-quic"}
		ln, err := quic.ListenAddr(addr, cfg, quicConfig())
		if err != nil {
			return err
		}
		go func() {
			for {
				conn, err := ln.Accept(context.Background())
				if err != nil {
					return
				}
				host, _, _ := net.SplitHostPort(conn.RemoteAddr().String())
				if host != clientIP() {
					conn.CloseWithError(0, "unauthorized IP")
					continue
				}
				go func(conn quic.Connection) {
					for {
						st, err := conn.AcceptStream(context.Background())
						if err != nil {
							return
						}
						go func(st quic.Stream) {
							b := make([]byte, 1)
							if _, err := st.Read(b); err != nil || p.pool.size() >= max {
								st.Close()
								return
							}
							raw := make([]byte, 4)
							rand.Read(raw)
							if _, err := st.Write(raw); err != nil {
								st.Close()
								return
							}
							p.pool.put(hex.EncodeToString(raw), streamConn{st, conn})
						}(st)
					}
				}(conn)
			}
		}()
		return nil
	}
}
