"""What the router measures and learns from, with no store and no model in sight: prompt
features and contexts (:mod:`.features`), trust posteriors (:mod:`.trust`), ATP costs
(:mod:`.atp`) and the metabolic state those signals drive (:mod:`.metabolic`).
"""
