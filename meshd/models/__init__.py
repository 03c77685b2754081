"""Models: the disk scan, the catalog, downloads and GPU detection."""
