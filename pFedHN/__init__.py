"""pFedHN: personalized federated learning with hypernetworks, on Flower."""

import os

# Ray's C++ core installs a crash handler that aborts the process when SIGTERM
# reaches one of its threads; read when Ray is imported, so set here, before. A
# run then stops cleanly on SIGTERM (pFedHN.signals). Set it to 0 to keep Ray's.
os.environ.setdefault("RAY_DISABLE_FAILURE_SIGNAL_HANDLER", "1")
