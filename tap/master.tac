# Master API on 127.0.0.1:9090 (open http://127.0.0.1:9090/api/v1/docs).
# Run:  twistd -ny tap/master.tac
# As a daemon, logging to a file:  twistd --logfile=nodepass.log -y tap/master.tac
# Override with NODEPASS_URL and NP_STATE_DIR.
import os

from nodepass.tap import application_for

application = application_for(os.environ.get("NODEPASS_URL", "master://127.0.0.1:9090/api?log=info"))
