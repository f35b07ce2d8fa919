"""Held-out English for perplexity: plain prose written for these tests, so no model has trained on it.

One text of a few hundred tokens measures a perplexity whose change under a
small perturbation of K/V swings by a percent either way (docs/benchmarks.md,
"FP8 KV cache"); :data:`ESSAYS`, about 800 tokens of SmolLM2's tokenizer on
five unrelated subjects, averages that out.
"""

from __future__ import annotations

ESSAYS = (
    "The bakery on the corner opens at five, long before the street wakes. The baker lights the oven first and "
    "weighs the flour while it warms, because a cold oven and a hurried scale spoil more bread than any mistake "
    "of the hand. By six the first loaves are cooling on wire racks near the window, and the smell reaches the "
    "bus stop across the road, where a few early workers stand with their collars turned up. Some of them cross "
    "over, buy a roll and eat it on the way, and the baker knows most of them by what they order rather than by "
    "name. On Saturdays her daughter works the counter, counts the change twice and writes the orders for "
    "birthday cakes in a notebook with a green cover, which has lasted three years and is nearly full.\n\n"
    "A river does not run straight for long. Where the ground is soft, water pushes against the outside of each "
    "bend and carries the bank away, grain by grain, and drops the sand again on the inside of the next bend, "
    "where the current is slow. Over many years the loops grow wider until two of them touch during a flood; "
    "then the river takes the short way through, and the old loop is left behind as a quiet, curved lake. "
    "Farmers who plant beside such a river learn to read its habits. They leave a strip of trees along the water, "
    "because roots hold the soil better than any wall, and they do not build where their grandparents remember "
    "the river once flowed, however dry that field may look in August.\n\n"
    "Learning a second language as an adult is mostly a matter of patience. The first weeks are full of small "
    "victories: a greeting understood, a menu read, a train ticket bought without pointing. Then comes a long "
    "flat stretch where nothing seems to improve. Conversations still move too fast, the radio is still noise, "
    "and every sentence must be built word by word before it can be spoken. Teachers say that this is when most "
    "people give up, and also that it is when the real progress happens, out of sight. One morning the learner "
    "notices that she has followed a whole joke, laughed at the right moment, and not translated a single word "
    "in her head. Nothing in particular changed that day; months of listening simply added up.\n\n"
    "The town council met on Tuesday evening to decide what to do about the old footbridge. Engineers had found "
    "rust in two of its beams, and the bridge had been closed since the spring. Repairing it would cost less "
    "than replacing it, but the repair would last perhaps fifteen years, while a new bridge might stand for "
    "sixty. Several residents spoke. A woman who runs a shop near the bridge said that her sales had fallen by a "
    "third since it closed, since customers from the far bank now had to walk twenty minutes around by the road. "
    "A retired teacher asked whether the new design would still have the iron railings that children had "
    "painted every summer for as long as anyone could remember. The council voted to build a new bridge, to keep "
    "the railings, and to publish the accounts of the project every quarter.\n\n"
    "Most of the stars that can be seen on a clear night are closer than they look and older than they seem. The "
    "light from the nearest ones left them a few years ago; from others it has travelled for centuries. Because "
    "the air moves and bends that light, stars near the horizon flicker and change colour, while planets, which "
    "show a small disk rather than a point, shine more steadily. An observer away from the lights of a city can "
    "count a few thousand stars with the naked eye, and with a pair of ordinary binoculars many more, along with "
    "the pale smudge of a galaxy so far away that its light set out before there were people to see it. Patience "
    "matters here too: the eye needs about twenty minutes in the dark before the faintest of them appear, and one "
    "glance at a bright phone screen starts the wait again."
)
