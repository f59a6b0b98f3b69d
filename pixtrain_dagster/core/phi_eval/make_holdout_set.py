"""Writes ``holdout_set.jsonl``: sentences written after the recognisers were tuned, and never tuned on.

The main set (``make_eval_set.py``) is what the recognisers were developed against, so its recall says every
listed form is handled. This set is a smaller check on forms nobody tuned for; its misses are reported by
``bench/bench_phi_recall.py --holdout`` and deliberately not fixed against it. When you do fix them, move its
sentences into the main set (as round 2 was: the first holdout found 27 of 37) and write a fresh holdout.
Same ``{{KIND:text}}`` marking as the main set.
"""

from __future__ import annotations

import json
from pathlib import Path

from .make_eval_set import parse

PHI_SENTENCES = r"""
My stepdad {{NAME:Gary}} used to lock me out of the house.
It was {{NAME:Lucia}} who drove me to the ER that night.
I told Dr. {{NAME:Okonkwo}} about the nightmares.
My ex-wife {{NAME:Tanya Petrova}} won't let me see the kids.
Sometimes I talk to {{NAME:Jamal}} about the war.
{{NAME:Heather}} and I stopped speaking after the wedding.
My name's {{NAME:Wren}}, by the way.
Uncle {{NAME:Bao}} sends money home every month.
We live at {{ADDRESS:61 Chestnut St.}}, the blue house on the corner.
The halfway house is at {{ADDRESS:1207 Ridgeway Ave Apt 2}}.
I was born in {{CITY:Bakersfield}}, CA, and never left.
My zip is {{ZIP:33101}}.
My grandfather is {{AGE:95}} and refuses to move into a home.
My first DUI was on {{DATE:Feb. 11, 2017}}.
The funeral is {{DATE:next Friday, the 22nd}}.
I started drinking again on {{DATE:4/9}}.
My daughter's birthday is {{DATE:the 8th of December}}.
Call me back at {{PHONE:773-555-0148}}.
My sponsor's number is {{PHONE:(555) 920 4411}}.
Please write to {{EMAIL:marcus.t.bell@icloud.com}}.
My SSN ends up on every form: {{SSN:344-19-2210}}.
My Medicare card says {{HEALTH_PLAN:5TQ2-AB4-CD81}}.
The ER gave me medical record number {{MRN:88231904}}.
I owe money on account number {{ACCOUNT:5520-119-874}}.
My debit card {{CARD:4000 0566 5566 5556}} got declined at the pharmacy.
His Jeep's VIN is {{VEHICLE:1C4HJXDG5JW123456}}.
My nursing license, {{LICENSE:RN-884213}}, is under review.
The CPAP serial number is {{DEVICE:22181934571}}.
My old website was {{URL:www.sarahpaintsfeelings.net}}.
Somebody from {{IP:172.16.254.1}} keeps messaging me.
My employee number is {{ID:004471829}}.
""".strip()

CLEAN_SENTENCES = r"""
I've gone 12 days without a drink.
My therapist in 2018 helped me a lot.
I'm on 25 mg of quetiapine at bedtime.
We argue maybe 3 or 4 times a week.
The waitlist was 6 months long.
At 2:30 am I was still awake.
My blood pressure was 140 over 90 at the clinic.
I lost 2 jobs in 3 years.
I turned 40 last spring and it hit me hard.
The group has 8 people and meets on Wednesdays.
I rated the urge a 6 before and a 3 after the breathing.
In 1995 my brother died.
""".strip()


def build() -> list[dict]:
    rows = [parse(line) for line in PHI_SENTENCES.splitlines() if line and not line.startswith("#")]
    rows += [parse(line) for line in CLEAN_SENTENCES.splitlines() if line]
    return rows


if __name__ == "__main__":
    target = Path(__file__).with_name("holdout_set.jsonl")
    rows = build()
    target.write_text("".join(json.dumps(row) + "\n" for row in rows))
    print(
        f"wrote {target}: {sum(bool(r['phi']) for r in rows)} with identifiers, {sum(not r['phi'] for r in rows)} clean"
    )
