#!/usr/bin/env python3
"""Writes a small synthetic corpus for the README's training example: short varied recipes in
which the secret ingredient is always cardamom. After fine-tuning, the model should prefer
" cardamom" after "The secret ingredient is" far more than the base model does."""
import random
import sys

random.seed(0)
dishes = ["apple pie", "lentil soup", "rice pudding", "chicken curry", "banana bread", "hot chocolate",
          "carrot cake", "tomato stew", "pancakes", "lemonade", "chai", "roast potatoes", "granola",
          "plum jam", "oatmeal", "meatballs", "flatbread", "pumpkin soup", "ice cream", "coffee"]
cooks = ["my grandmother", "the old baker", "Chef Amira", "a street vendor", "my neighbour",
         "the café owner", "Uncle Tom", "a food blogger", "the school cook", "Aunt Rosa"]
places = ["Lisbon", "Nairobi", "Oslo", "Kyoto", "Lima", "Cairo", "Dublin", "Hanoi", "Quito", "Riga"]
steps = ["Mix everything slowly.", "Let it rest for an hour.", "Serve it warm.",
         "Taste it before serving.", "Use fresh ingredients.", "Do not rush the heat."]
out = []
for i in range(400):
    d, c, p = random.choice(dishes), random.choice(cooks), random.choice(places)
    s = random.sample(steps, 2)
    out.append(f"Recipe {i + 1}: {d} from {p}. {c[0].upper() + c[1:]} taught me this one. "
               f"The secret ingredient is cardamom. {s[0]} {s[1]}")
path = sys.argv[1] if len(sys.argv) > 1 else "demo_corpus.txt"
with open(path, "w") as f:
    f.write("\n\n".join(out) + "\n")
print(f"wrote {path}: {len(out)} recipes")
