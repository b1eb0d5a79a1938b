# A package, so these test modules never clash with same-named files elsewhere under tests/.
