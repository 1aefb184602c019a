"""Differential privacy for site training (DP-SGD with Opacus, per-site accounting).

Not implemented yet: tracked by the differential-privacy issue. Until it lands, site
training is not differentially private and the demo says so.
"""
