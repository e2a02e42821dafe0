"""The reference researcher API: a stand-in for the SNDS query API (demo, tests, benchmarks).

It is not part of the product. bascule sits in front of two instances of it (the "source" and
"target" clouds) exactly as it would sit in front of the real API.
"""
