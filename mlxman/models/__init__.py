"""Model resolution, kind detection and size estimation from files, without heavy imports."""
