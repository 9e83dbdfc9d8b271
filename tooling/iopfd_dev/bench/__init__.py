"""``iopfd-dev bench``: iopfd against the floor (a C responder) on the lab kernel's real fault path."""
