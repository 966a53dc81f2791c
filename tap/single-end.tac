# Single-end forwarder: listens on 127.0.0.1:10101 (TCP and UDP) and relays to
# 127.0.0.1:8080.  Run:  twistd -ny tap/single-end.tac
# As a daemon, logging to a file:  twistd --logfile=nodepass.log -y tap/single-end.tac
# Override the instance with NODEPASS_URL, e.g.
#   NODEPASS_URL="client://0.0.0.0:2222/10.0.0.5:22?mode=1" twistd -ny tap/single-end.tac
import os

from nodepass.tap import application_for

application = application_for(os.environ.get("NODEPASS_URL", "client://127.0.0.1:10101/127.0.0.1:8080?mode=1&log=info"))
