# Tunnel server: handshake/pool port 10101 on all interfaces, TLS with an
# in-memory certificate; reverse mode when 127.0.0.1:8080 binds, forward
# otherwise.  Run:  twistd -ny tap/server.tac   (override with NODEPASS_URL)
# As a daemon, logging to a file:  twistd --logfile=nodepass.log -y tap/server.tac
import os

from nodepass.tap import application_for

application = application_for(os.environ.get("NODEPASS_URL", "server://0.0.0.0:10101/127.0.0.1:8080?tls=1&log=info"))
