"""Writes ``eval_set.jsonl``: therapy-style sentences with every identifier marked, plus clean sentences.

Sentences are written by hand; ``{{KIND:text}}`` marks an identifier. Run ``python -m
pixtrain_dagster.core.phi_eval.make_eval_set`` after editing; the JSONL is what the bench and the test read.
Each line: {"text": ..., "phi": [{"kind": ..., "text": ...}]} (an empty list for a clean sentence).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

PHI_SENTENCES = r"""
# NAME
My name is {{NAME:Jennifer Alvarez}} and I've been struggling since the move.
I told {{NAME:Marcus}} that I needed space, and he stopped texting me for a week.
My sister {{NAME:Keisha}} keeps saying I should just get over it.
Dr. {{NAME:Patel}} said the new dose might make me drowsy at first.
I keep thinking about what {{NAME:Robert}} said at the funeral.
When {{NAME:Linda}} left, the house felt so empty.
My husband {{NAME:Thomas}} doesn't understand why I can't sleep.
{{NAME:Sarah}} from group called me last night and we talked for an hour.
I'm {{NAME:Daniel Okafor}}, and my counselor at school referred me here.
My boss, {{NAME:Greg Henderson}}, yelled at me in front of everyone.
I had a fight with {{NAME:Jessica}} about money again.
Mrs. {{NAME:Kowalski}} next door checks on my mom when I'm at work.
My son {{NAME:Tyler}} is the reason I keep going.
Honestly {{NAME:Mike}} is the only friend who gets it.
My therapist before you, {{NAME:Laura Chen}}, moved to another state.
You can call me {{NAME:Ana}}, everyone does.
I dreamt about Grandpa {{NAME:Joe}} again.
Mr. {{NAME:Thompson}} at the pharmacy knows all my prescriptions.
My daughter {{NAME:Emily}} hasn't spoken to me since Christmas.
I guess I'm angry at {{NAME:Kevin}} for leaving without saying anything.
{{NAME:Brian}} and I have been married for twelve years.
My ex, {{NAME:Christopher Nguyen}}, still has the kids on weekends.
I went to see Dr. {{NAME:Rebecca Stein}} for the medication review.
My mother {{NAME:Patricia}} drinks every night and then calls me crying.
It was {{NAME:Amanda}} who found me that night and called for help.
My roommate {{NAME:Jordan}} thinks I'm overreacting.
I was named after my aunt {{NAME:Dolores}}, who passed away last year.
This is {{NAME:Miguel Hernandez}}, I'm calling about my appointment.
My coworker {{NAME:Steven}} makes comments about my weight.
Nurse {{NAME:Williams}} was kind to me in the ER.
I keep comparing myself to my cousin {{NAME:Ashley}}.
My brother {{NAME:Anthony}} relapsed again and I feel responsible.
{{NAME:Rachel}} said she'd come to the next session with me.
I talked to Pastor {{NAME:Davis}} about the guilt.
My girlfriend {{NAME:Megan}} wants me to try couples therapy.
I'm worried about my dad, {{NAME:Richard Lee}}, he's been forgetting things.
My best friend {{NAME:Nicole}} moved to the coast and I feel alone.
My grandson {{NAME:Ethan}} is the only one who visits.
I wrote a letter to {{NAME:Mark}} but never sent it.
{{NAME:Stephanie Brooks}} is my case manager at the clinic.
My partner {{NAME:Alex}} and I argue every time money comes up.
The social worker, Ms. {{NAME:Johnson}}, said she'd follow up.
I kept texting {{NAME:Kayla}} even after she blocked me.
My uncle {{NAME:Raymond}} hurt me when I was little.
I signed the form as {{NAME:Elizabeth Murphy}}.
My wife {{NAME:Maria}} says I'm distant.
My psychiatrist is Dr. {{NAME:Goldberg}}.
I called {{NAME:Justin}} to apologize, but he didn't pick up.
# AGE over 89
My grandmother is {{AGE:93}} and still lives alone.
My father turned {{AGE:91}} in the spring and barely recognizes me.
She's {{AGE:96}} years old and I'm her only caregiver.
He was {{AGE:102}} when he passed.
Taking care of a {{AGE:94}}-year-old is exhausting.
My great-aunt is {{AGE:90}} and sharper than I am.
I keep thinking my mom at {{AGE:98}} shouldn't have to see me like this.
My neighbor is {{AGE:92}} years old and I do her shopping.
Grandpa is {{AGE:99}} now.
# ZIP / CITY / ADDRESS
We moved to {{CITY:Fresno}}, CA {{ZIP:93722}} last spring.
I live in {{CITY:Springfield}}, IL now, far from everyone.
My mail goes to {{ZIP:60614}} but I'm staying at a friend's.
The shelter is in zip code {{ZIP:10027}}.
I grew up in {{CITY:Toledo}}, Ohio and never went back.
My address is {{ADDRESS:1423 Maple Avenue}}, {{CITY:Dayton}}, OH {{ZIP:45402}}.
I'm at {{ADDRESS:12 oak st apt 5}} if anything happens.
He lives at {{ADDRESS:77 Sunset Blvd}} now with his new girlfriend.
Send the forms to {{ADDRESS:PO Box 4471}}, please.
We stayed at {{ADDRESS:908 W. Grand Ave., Unit 3B}} after the eviction.
My mom's house on {{ADDRESS:45 Elm Street}} still has my childhood room.
I walk past {{ADDRESS:230 Park Rd}} every day and it triggers me.
The apartment at {{ADDRESS:5600 N Sheridan Rd #1204}} was the worst year of my life.
Our old place was {{ADDRESS:17 Birchwood Lane}}.
My father's house, {{ADDRESS:3301 Lakeshore Drive}}, is being sold.
I moved into {{ADDRESS:88 Pine Ct}} in the summer.
The clinic on {{ADDRESS:410 Main St Suite 200}} is where I get my shots.
We were living at {{ADDRESS:2 Harbor View Terrace}} when it happened.
My ZIP is {{ZIP:02139}}, if you need it for the form.
I got a new job in {{CITY:Tucson}}, AZ.
She moved to {{CITY:Bend}}, Oregon {{ZIP:97701}}.
We drove back from {{CITY:Macon}}, GA after the funeral.
I'm staying at {{ADDRESS:1600 Cherry Hill Rd}}, {{CITY:Baltimore}}, MD {{ZIP:21225}} for now.
He's in {{CITY:Rochester}}, NY {{ZIP:14604-1234}} these days.
Text me when you get to {{ADDRESS:19 Hawthorne Pl}}.
I rent a room at {{ADDRESS:742 Evergreen Terrace}}.
# DATE
I was admitted {{DATE:Jan 5}} and discharged a week later.
My birthday is {{DATE:March 14}}, and it always makes me sad.
The accident was on {{DATE:11/02/2019}}.
I was born on {{DATE:July 4th, 1988}}.
My DOB is {{DATE:04/22/1975}}.
We broke up on {{DATE:2/14}}, of all days.
My dad died {{DATE:December 3rd}}.
The court date is {{DATE:9/18/24}}.
My last drink was {{DATE:October 12, 2023}}.
I started the new medication on {{DATE:2024-03-01}}.
Since {{DATE:the 15th of August}} I haven't slept properly.
My follow-up is {{DATE:Tuesday, June 3}}.
She was discharged on {{DATE:5.6.2022}}.
The anniversary of the assault is {{DATE:Sept 9}}.
I got the diagnosis on {{DATE:1 February 2021}}.
My appointment got moved to {{DATE:Aug. 22}}.
My son was born {{DATE:3/30/2015}}.
I'm dreading {{DATE:Nov 27}} because the whole family will be there.
I was hospitalized from {{DATE:June 2}} to {{DATE:June 9}}.
The eviction notice came on {{DATE:April 1st}}.
We got married on {{DATE:the 21st of May, 2010}}.
My mom's surgery is on {{DATE:12-05-2025}}.
I relapsed around {{DATE:Feb 28}}.
The last time I self-harmed was {{DATE:January 19th}}.
My intake was dated {{DATE:20230915}}.
# PHONE / FAX
You can reach me at {{PHONE:(555) 201-3344}}.
My cell is {{PHONE:555-867-5309}}.
Call my mom at {{PHONE:312.555.0199}} if I don't show up.
My number is {{PHONE:555-0143}}, it's a landline.
Her phone is {{PHONE:+1 415 555 2671}}.
My work line is {{PHONE:(212) 555-7788 ext. 42}}.
Text me at {{PHONE:6175550123}} after the session.
My sister lives in London, her number is {{PHONE:+44 20 7946 0958}}.
Please fax the records to {{PHONE:(555) 402-9911}}.
Our fax number is {{PHONE:555.402.9912}}.
I called {{PHONE:1-555-332-1010}} twice but nobody answered.
His mobile: {{PHONE:555 123 4567}}.
My dad's number is {{PHONE:867-5309}}.
You can leave a message at {{PHONE:555-201-3344 x12}}.
Reach me on {{PHONE:+52 55 1234 5678}} when I'm in Mexico.
The office phone is {{PHONE:555-246-8100}}.
# EMAIL
Email me at {{EMAIL:jen.alvarez88@gmail.com}} with the worksheet.
My work email is {{EMAIL:d.okafor@acme-logistics.com}}.
I got a message from {{EMAIL:tyler_k2009@yahoo.com}} last night.
Send it to {{EMAIL:mom.and.dad@comcast.net}}.
He keeps writing to {{EMAIL:rachel+therapy@proton.me}}.
My old address was {{EMAIL:sadgirl_1999@hotmail.com}}.
Please copy {{EMAIL:caseworker@county.gov}} on the letter.
I made a new account, {{EMAIL:fresh.start2024@outlook.com}}.
# SSN
My social is {{SSN:123-45-6789}}.
The form asked for my SSN, {{SSN:123.45.6789}}.
SSN: {{SSN:123456789}}.
They wrote my social security number as {{SSN:321 54 9876}}.
I accidentally gave my SSN {{SSN:078-05-1120}} to that caller.
My son's social is {{SSN:219 09 9999}}.
I typed {{SSN:456789123}} for my social security number on the application.
Her SS# is {{SSN:512-44-7781}}.
# MRN
My medical record number is {{MRN:00482913}}.
MRN {{MRN:A1234567}} is on my wristband.
The hospital chart number was {{MRN:HC-228193}}.
My patient ID is {{MRN:PT00998812}}.
They put {{MRN:MRN-7741820}} on every page.
The discharge paper lists record #{{MRN:55120983}}.
# HEALTH_PLAN
My Medicare number is {{HEALTH_PLAN:1EG4-TE5-MK73}}.
Medicare ID {{HEALTH_PLAN:1EG4TE5MK73}} is on the card.
My Medicaid ID is {{HEALTH_PLAN:CA9876543210}}.
My insurance member ID is {{HEALTH_PLAN:XGH123456789}}.
The health plan number is {{HEALTH_PLAN:W2938475601}}.
Medicaid number {{HEALTH_PLAN:11223344A}} was denied at the pharmacy.
My Blue Cross policy number is {{HEALTH_PLAN:BCX-4471-9932}}.
Group number {{HEALTH_PLAN:884512}} on my insurance card.
# ACCOUNT
My bank account number is {{ACCOUNT:000123456789}}.
The overdraft hit account {{ACCOUNT:4419-2231-07}}.
My checking account # is {{ACCOUNT:987654321012}}.
The routing number is {{ACCOUNT:021000021}} and I gave it to a stranger.
The collector keeps calling about account number {{ACCOUNT:AC-77120394}}.
My IBAN is {{ACCOUNT:GB82 WEST 1234 5698 7654 32}}.
# CARD
I used my card {{CARD:4111 1111 1111 1111}} and now I'm scared.
He stole my Visa, {{CARD:4012888888881881}}.
The credit card number is {{CARD:5555-5555-5555-4444}}.
My Amex is {{CARD:3782 822463 10005}}.
I gave {{CARD:6011111111111117}} to the online pharmacy.
The card ending in {{CARD:4242 4242 4242 4242}} was maxed out.
# LICENSE / CERTIFICATE
My driver's license number is {{LICENSE:D1234567}}.
License # {{LICENSE:S530-4123-9987}} was suspended after the DUI.
My nursing license number is {{LICENSE:RN1234567}}.
My DEA number is {{LICENSE:AB1234563}}.
The birth certificate number is {{LICENSE:142-2019-009871}}.
His CDL license no. {{LICENSE:F255-921-50-094-0}} got revoked.
My passport number is {{LICENSE:X12345678}}.
# VEHICLE
My car's VIN is {{VEHICLE:1HGCM82633A004352}}.
The truck, VIN {{VEHICLE:5YJSA1E26HF000337}}, was repossessed.
He drives a silver sedan, plate {{VEHICLE:7ABC123}}.
The license plate was {{VEHICLE:XYZ-4821}}.
I memorized his plate number, {{VEHICLE:8KDL 442}}.
My car's tag is {{VEHICLE:BHK 2290}}.
# DEVICE
My pacemaker serial number is {{DEVICE:PM8842-77123}}.
The insulin pump serial is {{DEVICE:SN 4471-AXQ-20}}.
My phone's IMEI is {{DEVICE:356938035643809}}.
The CPAP device ID is {{DEVICE:RS10-99812-B}}.
My hearing aid serial no. {{DEVICE:HA2291834}} is on the box.
# URL
My blog is at {{URL:https://www.mydarkdays.blogspot.com/posts/42}}.
I posted about it on {{URL:www.reddit.com/u/quiet_storm_88}}.
Look at {{URL:http://jenalvarez.me}} if you want to see my art.
My profile is {{URL:instagram.com/daniel.okafor}}.
He sent me {{URL:https://bit.ly/3xYzAbc}} and it was awful.
My fundraiser is {{URL:gofundme.com/f/help-maria-recover}}.
# IP
The harassment came from {{IP:192.168.14.201}}.
My laptop's IP was {{IP:73.162.44.19}} when it got hacked.
He logged in from {{IP:2001:0db8:85a3:0000:0000:8a2e:0370:7334}}.
The router shows {{IP:10.0.0.23}} as the device he used.
The address {{IP:fe80::1ff:fe23:4567:890a}} showed up in the logs.
# ID (other labelled ID numbers)
My employee ID is {{ID:E-4471982}}.
My student ID number is {{ID:20231187}}.
Case number {{ID:2023-CV-004417}} is my custody hearing.
My inmate number was {{ID:A-558812}}.
The claim number is {{ID:CLM88123409}}.
My probation ID is {{ID:PR-99120}}.
My badge number is {{ID:44721}}.
The police report number is {{ID:24-118832}}.
My client ID at the food bank is {{ID:FB-20931}}.
# mixed
{{NAME:Carlos}} called me from {{PHONE:555-204-9981}} on {{DATE:March 3}}, drunk again.
I gave my address, {{ADDRESS:14 Willow Way}}, {{CITY:Eugene}}, OR {{ZIP:97401}}, to the crisis team.
My mom, {{NAME:Gloria}}, is {{AGE:91}} and lives at {{ADDRESS:220 Oak Ridge Dr}}.
Dr. {{NAME:Feldman}} faxed my chart to {{PHONE:(555) 333-0110}} on {{DATE:10/14/2023}}.
Email {{EMAIL:gloria.r@aol.com}} or call {{PHONE:555-0178}}.
# round 2: the first holdout set, moved here after it was measured (27 of 37 found) and tuned on
Honestly, {{NAME:Priya}} is the one person I trust at work.
Last night {{NAME:Dmitri}} showed up drunk at my door again.
My fiancé {{NAME:Oluwaseun Adeyemi}} thinks I should quit.
I keep replaying the argument with {{NAME:Becky}} in my head.
Coach {{NAME:Ramirez}} benched me and I stopped eating.
My foster mom, {{NAME:Deborah Sinclair}}, was the first adult who believed me.
We named the baby {{NAME:Harper}} after my grandmother.
{{NAME:Theo}} hasn't returned my calls in a month.
I live off {{ADDRESS:Route 9}} near the old mill, {{ADDRESS:4410 County Road 12}}.
Our trailer is lot 14 at {{ADDRESS:300 Pinecrest Circle}}.
She moved to {{CITY:Scranton}}, Pennsylvania, to be near her kids.
Mail it to {{ADDRESS:88 Ocean Pkwy Apt 6F}}, {{CITY:Brooklyn}}, NY {{ZIP:11218}}.
My grandma just turned {{AGE:97}} and she still asks about my dad.
The appointment is on {{DATE:the 3rd}} at noon, I think.
I got out of detox on {{DATE:12/24}}, Christmas Eve.
Dad passed away {{DATE:March 2nd, 2019}}, and I still can't say it out loud.
Mom's birthday is {{DATE:Oct 30}}.
My court hearing was moved to {{DATE:Thursday the 14th}}.
You can text my cell, {{PHONE:(919) 555-0187}}, if I miss the appointment.
My husband's work number is {{PHONE:555.773.2011 extension 309}}.
Call the house at {{PHONE:555 0192}}.
Email {{EMAIL:t.nguyen@stanford.edu}} if you need my transcript.
I gave them my social, {{SSN:601-22-8841}}, over the phone.
The bill lists account {{ACCOUNT:77104-2290}} and it's in collections.
My Medi-Cal number is {{HEALTH_PLAN:91234567A}}.
My insurance ID is {{HEALTH_PLAN:ZQH882201934}}.
The pharmacy has my record number as {{MRN:RX-5531907}}.
My old Mastercard, {{CARD:5105 1051 0510 5100}}, was stolen at the shelter.
His truck's plate is {{VEHICLE:TX 4KL-9921}}.
My license number is {{LICENSE:WDL4471AB92}}.
The glucose monitor serial number is {{DEVICE:G6-88341-XZ}}.
Someone logged into my email from {{IP:203.0.113.77}}.
I found his profile at {{URL:https://facebook.com/derek.m.walsh}}.
My parole officer number, the case is {{ID:P-2021-33871}}.
""".strip()

CLEAN_SENTENCES = r"""
I've been sleeping about 5 hours a night for the past 3 weeks.
On a scale of 0 to 10, my anxiety is around a 7 today.
The doctor raised my sertraline to 100 mg in the morning.
This is our 12th session, and I finally feel like it's helping.
I take 0.5 mg of lorazepam when the panic gets really bad.
Back in 2019 things were much worse than now.
I drink maybe 2 or 3 beers on weekends, not during the week.
We meet every Tuesday at 4:30 pm.
I've lost 15 pounds since the divorce.
I'm 34 and I feel like I've wasted my twenties.
My son is 8 and he's started asking questions.
My panic attacks last about 10 to 20 minutes.
I walked 3 miles yesterday, which felt like a win.
I was sober for 90 days before I slipped.
In 2020 I lost my job and my apartment.
The PHQ-9 score went from 19 to 11.
My GAD-7 was 14 last time.
I take 20 mg of fluoxetine and 50 mg of trazodone at night.
I've been in therapy on and off for 6 years.
It's been 2 years since my father died.
I wake up at 3 am almost every night.
My heart rate goes up to 120 when I panic.
I cried for about 45 minutes after the call.
I spent 400 dollars I didn't have on things I don't need.
We've done 8 sessions of CBT so far.
I scored 25 on the intake questionnaire.
I sleep from 11 to 6 most nights.
I have maybe 1 good day out of 7.
I'm in 10th grade and school is a lot right now.
The group meets twice a week for 90 minutes.
I was 16 when it first happened.
I'd rate my mood a 3 out of 10 this week.
I drink 4 cups of coffee a day.
I've been clean for 18 months.
My mom is 67 and still works full time.
In 1998 my parents split up.
I work 60 hours a week and I'm exhausted.
It takes me 30 minutes to calm down after an argument.
I've been on 3 different antidepressants.
The last time I felt okay was maybe 2016.
I had 2 panic attacks this week, down from 5.
My daughter is 15 and won't talk to me.
I'm taking 300 mg of lithium twice a day.
Session 4 was the hardest so far.
I've tried to quit smoking 5 times.
I spent the first 20 years of my life trying to please him.
I journal for 10 minutes before bed.
My dad is 72 and refuses to see a doctor.
If I'm in crisis I know I can call or text 988.
In an emergency I'd call 911.
The old suicide prevention lifeline is 1-800-273-8255 and it still works.
My counselor said I could text HOME to 741741 for the Crisis Text Line.
I saved the SAMHSA helpline, 1-800-662-4357, in my phone.
The domestic violence hotline is 1-800-799-7233, she gave me the card.
You can call 211 to find local services.
The Trevor Project number, 1-866-488-7386, helped me when I came out.
Veterans can press 1 after dialing 988.
I used to think 40 was old.
Around 2 in the afternoon my energy crashes.
Between 2015 and 2018 I barely left the house.
I read 2 chapters of the workbook.
My rent went up by 200 a month.
I'm 5 foot 4 and I weigh 130 pounds.
We did the 5-4-3-2-1 grounding exercise and it helped.
My sleep tracker says I got 6.5 hours.
I've had 4 sessions with the psychiatrist this year.
At 7 pm every night I start to dread the next day.
I moved 3 times in 2 years.
Week 6 of the program starts next Monday.
I managed 4 out of 7 days of exercise this week.
My sister is 29 and I'm 31.
Between 9 and 10 at night is when the cravings hit.
I've been taking 150 mg of bupropion for 2 months.
We've had 14 sessions and I still don't trust easily.
In 2011 we moved across the country.
I sleep maybe 4 hours, sometimes 5.
I have 3 kids under 10.
My score on the anxiety scale dropped from 15 to 9.
It's been 6 weeks since my last panic attack.
I used to run 5k every Saturday.
Around 11:15 pm I start checking the locks.
""".strip()

_MARK = re.compile(r"\{\{([A-Z_]+):(.+?)\}\}")


def parse(line: str) -> dict:
    phi = [{"kind": m.group(1), "text": m.group(2)} for m in _MARK.finditer(line)]
    return {"text": _MARK.sub(lambda m: m.group(2), line), "phi": phi}


def build() -> list[dict]:
    rows = [parse(line) for line in PHI_SENTENCES.splitlines() if line and not line.startswith("#")]
    rows += [parse(line) for line in CLEAN_SENTENCES.splitlines() if line]
    return rows


if __name__ == "__main__":
    target = Path(__file__).with_name("eval_set.jsonl")
    rows = build()
    target.write_text("".join(json.dumps(row) + "\n" for row in rows))
    print(
        f"wrote {target}: {sum(bool(r['phi']) for r in rows)} sentences with PHI, "
        f"{sum(not r['phi'] for r in rows)} clean"
    )
