"""Where state lives: blobs (``content``), per-ref records (``metadata``) and leases (``locks``)."""
