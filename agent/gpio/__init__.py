"""The board's GPIO lines: call button, door relay, status LED and tamper switch.

``chip`` is the interface the rest of the agent sees (our own types); ``gpiod_chip``
implements it on libgpiod v2 (the only module that sees ``gpiod``), ``fake`` in memory
for tests and labs. ``debounce`` is pure; ``door`` says who may open the door;
``board`` puts the lines of a board profile to work.
"""
