"""The module tree: architectures, the pair and folding algebra, structural edits, targets, costs."""
