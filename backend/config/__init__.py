"""What a configure call says, parsed and checked before anything starts: the model spec (URI,
hooks, registry, credentials), its training policy, and the Antenna pipeline its labeling config defines.

May import: core, labeling.
"""
