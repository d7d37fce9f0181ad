"""Search: a knob space, strategies that walk it, and the runner that evaluates what they ask for."""
