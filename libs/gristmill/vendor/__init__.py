"""Tools for the vendor of Gristmill, not for installs (the licence issuer)."""
