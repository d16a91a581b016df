"""Parity with the authors' code: fixtures from their implementations, checked against ours."""
