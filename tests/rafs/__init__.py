"""Tests of the RAFS v6 / EROFS image reader."""
