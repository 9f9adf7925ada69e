"""Generate train/data/bitext_sample.jsonl: the project's own customer-support sample.

Why it exists: the default run (configs/tiny.yaml) and the tests need data in the schema of the
Hugging Face dataset `bitext/Bitext-customer-support-llm-chatbot-training-dataset` (fields
flags, instruction, category, intent, response), without a download and without shipping the
third-party rows (their license asks us not to copy them into the repository). Every row here is
written by this script: instruction templates × intents × products × phrasings, drawn with a
fixed seed, so re-running it reproduces the file byte for byte.

Shape, chosen to resemble the real data where it matters to training and batching:
  * instructions of roughly 10-25 words, with the real data's language variations marked in
    `flags` (B basic, I interrogative, P polite, Q colloquial, L lexical variant, Z typos);
  * responses of 40-150 words (an opener, numbered steps, an optional note, a closing line), so
    the tokenised lengths have a mean around 150 tokens and a long tail, like Bitext's;
  * `{{Placeholder}}` slots (e.g. `{{Order Number}}`) in the responses, as the real data has.

Deliberately bad rows (exactly 4, at fixed positions), so the default run exercises
`data.bad_rows: skip` and the tests can check that they are dropped and counted:
  * a row whose `response` is the empty string,
  * a row without an `instruction` key,
  * a row whose `category` is a number instead of text,
  * a row whose `response` is null.

    python scripts/make_sample.py            # rewrites train/data/bitext_sample.jsonl
    python scripts/make_sample.py --check    # exit 1 if the committed file is stale
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from pathlib import Path
from string import Template

SEED = 20240611
OUT = Path(__file__).resolve().parents[1] / "train" / "data" / "bitext_sample.jsonl"
ROWS_PER_INTENT = 15  # 26 intents → 390 good rows, + 4 bad rows

PRODUCTS = [
    "wireless headphones", "standing desk", "espresso machine", "running shoes", "smart watch",
    "winter jacket", "air purifier", "gaming laptop", "yoga mat", "kitchen knife set",
    "baby stroller", "office chair", "bluetooth speaker", "electric toothbrush", "backpack",
]
WHEN = ["yesterday", "last week", "two days ago", "this morning", "on Monday", "a month ago"]
ORDER_IDS = ["#48213", "ORD-77120", "number 559031", "#102938", "ORD-33415", "number 884120"]
GREETINGS = ["hi,", "hello,", "hey there,", "good morning,", "hi there,"]
POLITE = ["could you please", "would you kindly", "can you please"]
SUFFIXES = [
    "thanks in advance", "it is kind of urgent", "I have been waiting for a while",
    "I could not find it on the website", "my friend said you could help", "thank you so much",
]

# Per intent: instruction templates (slots $product, $order, $when) and response parts.
# `steps` are kept in order; a row uses a random prefix-preserving subset of them.
INTENTS: dict[tuple[str, str], dict[str, list[str]]] = {
    ("ACCOUNT", "create_account"): {
        "ask": ["open a new account for my family", "create an account on your site",
                "sign up for a customer account", "register a new profile so I can buy a $product"],
        "open": ["Welcome aboard! I'm glad you want to join us, and creating an account only takes a few minutes.",
                 "Thank you for choosing to open an account with us; I'll guide you through every step."],
        "steps": ["Go to {{Website URL}} and click on {{Sign Up}} in the top corner.",
                  "Enter your full name, email address and a password you do not use elsewhere.",
                  "Choose the {{Account Type}} that suits you best, personal or business.",
                  "Read the terms of service and tick the box to accept them.",
                  "Open the confirmation email we send you and click the verification link.",
                  "Log in and complete your profile under {{Profile Settings}}."],
    },
    ("ACCOUNT", "delete_account"): {
        "ask": ["delete my account permanently", "close my profile and remove my data",
                "get rid of my account, I do not use it anymore", "remove the account linked to my email"],
        "open": ["I'm sorry to see you go, and I understand you would like your account closed.",
                 "I understand that you want to delete your account, and I'll make the process clear."],
        "steps": ["Sign in to your account at {{Website URL}}.",
                  "Open {{Account Settings}} and scroll down to {{Close Account}}.",
                  "Tell us, if you wish, why you are leaving; it helps us improve.",
                  "Confirm the deletion by entering your password once more.",
                  "Watch for the email confirming that your data has been removed within {{Data Removal Period}}."],
    },
    ("ACCOUNT", "recover_password"): {
        "ask": ["reset my password, I forgot it", "recover access to my account",
                "get a new password because the old one stopped working", "log in again after losing my password"],
        "open": ["Losing a password happens to everyone, and I'm here to help you get back into your account.",
                 "I understand how frustrating it is to be locked out; let's restore your access right away."],
        "steps": ["Visit the login page at {{Website URL}}.",
                  "Click on {{Forgot Password}} below the sign-in button.",
                  "Type the email address registered with your account and submit it.",
                  "Open the reset email and follow the link within {{Reset Link Validity}}.",
                  "Choose a strong new password and confirm it.",
                  "Sign in with the new password and review your {{Security Settings}}."],
    },
    ("ACCOUNT", "edit_account"): {
        "ask": ["change the phone number on my account", "update my personal details",
                "edit the name shown on my profile", "modify the email address saved in my account"],
        "open": ["Keeping your details up to date is important, and I'm happy to show you how to edit them.",
                 "Of course! Updating your account information is simple, and here is how."],
        "steps": ["Log in to your account on {{Website URL}}.",
                  "Go to {{Profile Settings}} from the menu under your name.",
                  "Click {{Edit}} next to the information you want to change.",
                  "Enter the new details and press {{Save Changes}}.",
                  "Confirm the change through the code we send to your phone or email."],
    },
    ("ORDER", "cancel_order"): {
        "ask": ["cancel order $order", "cancel the $product I ordered $when",
                "stop my purchase $order before it ships", "call off the order for a $product"],
        "open": ["I understand that you would like to cancel order {{Order Number}}, and I'm here to help.",
                 "I hear you, and cancelling the purchase of your $product is something we can sort out together."],
        "steps": ["Sign in to your account on {{Website URL}}.",
                  "Open the {{Online Order Interaction}} section and find {{Order History}}.",
                  "Locate order {{Order Number}} in the list of recent purchases.",
                  "Click the {{Cancel Order}} button next to it.",
                  "Choose a reason for the cancellation and confirm.",
                  "Check your inbox for the cancellation confirmation email."],
    },
    ("ORDER", "change_order"): {
        "ask": ["change the size in order $order", "add a $product to the order I placed $when",
                "swap an item in my purchase $order", "modify my order before it is shipped"],
        "open": ["Thanks for reaching out! Changing an order is usually possible as long as it has not shipped yet.",
                 "I'd be glad to help you adjust order {{Order Number}} so you get exactly what you need."],
        "steps": ["Log in and go to {{Order History}}.",
                  "Select order {{Order Number}} and click {{Edit Order}}.",
                  "Add, remove or replace items, or change sizes and colours.",
                  "Review the new total, including any difference in price.",
                  "Confirm the changes before {{Order Cutoff Time}}."],
    },
    ("ORDER", "place_order"): {
        "ask": ["buy a $product from your store", "place an order for two $product items",
                "purchase a $product and have it delivered", "make an order online for a $product"],
        "open": ["How exciting that you want to order a $product! I'll walk you through the checkout.",
                 "Thank you for shopping with us; placing an order takes only a few clicks."],
        "steps": ["Search for the $product on {{Website URL}} or browse the {{Product Category}} page.",
                  "Pick the model, size or colour you like and click {{Add to Cart}}.",
                  "Open your cart and check the items and quantities.",
                  "Proceed to {{Checkout}} and enter your shipping address.",
                  "Choose a payment method and a delivery option.",
                  "Place the order and keep the confirmation number {{Order Number}}."],
    },
    ("ORDER", "track_order"): {
        "ask": ["track order $order", "know where my $product is right now",
                "check the status of the package I ordered $when", "follow the delivery of purchase $order"],
        "open": ["I completely understand that you want to know where your package is.",
                 "Waiting for a $product can be exciting; let's find out exactly where it is."],
        "steps": ["Log in to {{Website URL}} and open {{Order History}}.",
                  "Click on order {{Order Number}} to open its details.",
                  "Press {{Track Shipment}} to see the carrier's latest update.",
                  "Use the tracking number {{Tracking Number}} on the carrier's site for more detail.",
                  "Turn on notifications to be told when the parcel is out for delivery."],
    },
    ("SHIPPING", "change_shipping_address"): {
        "ask": ["change the shipping address of order $order", "send my $product to a different address",
                "update where my package is delivered", "correct a typo in my delivery address"],
        "open": ["No problem! Making sure your parcel reaches the right door is a priority for us.",
                 "I understand that your address has changed, and I'll help you update it."],
        "steps": ["Sign in and open {{Order History}}.",
                  "Select order {{Order Number}} and click {{Change Address}}.",
                  "Enter the new street, city and postal code carefully.",
                  "Save the change and check the updated delivery estimate.",
                  "If the order has already shipped, contact the carrier with {{Tracking Number}}."],
    },
    ("SHIPPING", "set_up_shipping_address"): {
        "ask": ["add a new shipping address to my account", "save my office as a delivery address",
                "set up a default address for my orders", "register a second address for deliveries"],
        "open": ["Setting up a shipping address saves you time at every checkout; here is how to do it.",
                 "I'm glad to help you add a delivery address to your account."],
        "steps": ["Log in to your account on {{Website URL}}.",
                  "Go to {{Account Settings}} and open {{Addresses}}.",
                  "Click {{Add New Address}} and fill in every field.",
                  "Tick {{Set as Default}} if you want to use it for future orders.",
                  "Save the address and check that it appears in the list."],
    },
    ("REFUND", "get_refund"): {
        "ask": ["get my money back for the $product", "request a refund for order $order",
                "be reimbursed for a broken $product", "receive a refund for something I returned $when"],
        "open": ["I'm sorry the $product did not work out for you; I'll explain how to get your refund.",
                 "I understand you would like a refund, and I'll make sure you know each step."],
        "steps": ["Log in and open {{Order History}}.",
                  "Select order {{Order Number}} and click {{Request Refund}}.",
                  "Pick the items concerned and describe the reason briefly.",
                  "Attach photos if the item arrived damaged.",
                  "Send the item back using the prepaid label, if a return is needed.",
                  "Expect {{Refund Amount}} on your original payment method within {{Refund Period}}."],
    },
    ("REFUND", "track_refund"): {
        "ask": ["check the status of my refund", "know when my refund for order $order arrives",
                "find out why my refund has not come yet", "see if the money for the returned $product was sent"],
        "open": ["I understand that waiting for a refund can be stressful; let's see where it stands.",
                 "Thank you for your patience; I'll show you how to follow your refund."],
        "steps": ["Open {{Order History}} in your account.",
                  "Select order {{Order Number}} and look at the {{Refund Status}} field.",
                  "Compare the date shown with our usual {{Refund Period}}.",
                  "Check your bank statement, as banks can add a few days."],
    },
    ("REFUND", "check_refund_policy"): {
        "ask": ["know your refund policy", "see the conditions for getting my money back",
                "understand if a $product can be refunded after a month", "read the rules about refunds"],
        "open": ["Great question! Knowing the refund policy before you buy gives you peace of mind.",
                 "I'm happy to explain our refund policy in plain words."],
        "steps": ["Most items can be returned within {{Return Window}} of delivery.",
                  "Items must be unused and in their original packaging.",
                  "Digital products and gift cards are not refundable.",
                  "Refunds go back to the original payment method within {{Refund Period}}.",
                  "The full policy is on {{Refund Policy Page}}."],
    },
    ("PAYMENT", "check_payment_methods"): {
        "ask": ["know which payment methods you accept", "pay with a credit card or with PayPal",
                "find out if I can pay in installments for a $product", "see the ways I can pay"],
        "open": ["We want paying to be easy, so we accept several methods.",
                 "Thanks for asking! Here are the payment options available to you."],
        "steps": ["Credit and debit cards: Visa, Mastercard and American Express.",
                  "PayPal, for a quick checkout without typing your card details.",
                  "Bank transfer, with the order shipped once the payment arrives.",
                  "Installments through {{Installment Provider}} for orders above {{Minimum Amount}}.",
                  "Gift cards, which can be combined with any other method."],
    },
    ("PAYMENT", "payment_issue"): {
        "ask": ["fix a problem with my payment", "understand why my card was declined for the $product",
                "solve an error I get when I pay", "sort out being charged twice for order $order"],
        "open": ["I'm sorry you ran into trouble while paying; let's get it sorted.",
                 "Payment problems are annoying, and I'm here to help you solve this one."],
        "steps": ["Check that the card number, expiry date and security code are correct.",
                  "Make sure the billing address matches the one your bank has.",
                  "Ask your bank whether it blocked the payment for security reasons.",
                  "Try another payment method, such as PayPal.",
                  "If you were charged twice, send us the transaction references at {{Customer Support Email}}."],
    },
    ("INVOICE", "get_invoice"): {
        "ask": ["get an invoice for order $order", "download the bill for the $product I bought",
                "receive a receipt for my purchase $when", "obtain an invoice with my company details"],
        "open": ["Of course! You can get your invoice in a few simple steps.",
                 "I understand that you need an invoice for your records; here is how to get it."],
        "steps": ["Log in and open {{Order History}}.",
                  "Find order {{Order Number}} and click {{Invoice}}.",
                  "Add your company name and tax number under {{Billing Details}} if needed.",
                  "Download the PDF, or have it sent to your email."],
    },
    ("INVOICE", "check_invoice"): {
        "ask": ["check the amount on invoice {{Invoice Number}}", "see the invoices from $when",
                "review a bill that looks wrong", "look at the invoice for the $product"],
        "open": ["I'm here to help you review your invoice and make sure every line is right.",
                 "Thanks for checking your invoice carefully; let's look at it together."],
        "steps": ["Open {{Invoices}} in your account.",
                  "Select invoice {{Invoice Number}} to see its lines.",
                  "Compare the items, taxes and shipping with your order confirmation.",
                  "Report any difference through {{Billing Support}} and we will correct it."],
    },
    ("DELIVERY", "delivery_options"): {
        "ask": ["know what delivery options you offer", "get my $product delivered faster",
                "choose a pickup point instead of home delivery", "find out if you deliver on weekends"],
        "open": ["We offer several delivery options so you can pick what suits you.",
                 "Great question! Here are the ways we can get your order to you."],
        "steps": ["Standard delivery, usually within {{Standard Delivery Time}}.",
                  "Express delivery, within {{Express Delivery Time}} for an extra fee.",
                  "Pickup at one of our {{Pickup Points}} near you.",
                  "Same-day delivery in selected cities such as {{Delivery City}}."],
    },
    ("DELIVERY", "delivery_period"): {
        "ask": ["know how long delivery takes", "find out when my $product will arrive",
                "check the delivery time for order $order", "learn whether it will arrive before the weekend"],
        "open": ["I understand you want to plan around your delivery; here is what to expect.",
                 "Knowing when your parcel arrives helps a lot, so let me explain."],
        "steps": ["Standard orders arrive within {{Standard Delivery Time}}.",
                  "Express orders arrive within {{Express Delivery Time}}.",
                  "The exact estimate for order {{Order Number}} is shown in {{Order History}}.",
                  "Public holidays and remote areas can add a day or two."],
    },
    ("CONTACT", "contact_customer_service"): {
        "ask": ["contact customer service", "talk to your support team about a $product",
                "find your customer support phone number", "reach someone about order $order"],
        "open": ["We're always happy to hear from you, and there are several ways to reach us.",
                 "I'm glad you asked; our support team is easy to contact."],
        "steps": ["Call {{Customer Support Phone Number}} during {{Customer Support Hours}}.",
                  "Write to {{Customer Support Email}}; we answer within a day.",
                  "Use {{Live Chat Support}} on {{Website URL}} for quick questions.",
                  "Send us a message through the contact form in {{Help Center}}."],
    },
    ("CONTACT", "contact_human_agent"): {
        "ask": ["speak with a real person", "talk to a human agent, not a bot",
                "be transferred to an agent about my $product", "chat with someone from your team"],
        "open": ["I understand that some questions need a person, and I'll connect you with one.",
                 "Of course! Let me tell you how to reach one of our agents."],
        "steps": ["Type {{Agent Keyword}} in this chat to be put in the queue.",
                  "Call {{Customer Support Phone Number}} and choose option {{Agent Option}}.",
                  "Agents are available during {{Customer Support Hours}}."],
    },
    ("FEEDBACK", "complaint"): {
        "ask": ["file a complaint about my $product", "complain about the service I received $when",
                "report that my order $order arrived broken", "tell you I am unhappy with the delivery"],
        "open": ["I'm truly sorry about your experience, and thank you for telling us.",
                 "I apologise for the trouble with your $product; your complaint matters to us."],
        "steps": ["Describe what happened in {{Complaint Form}}, with the order number {{Order Number}}.",
                  "Add photos or documents that show the problem.",
                  "Our team reviews every complaint within {{Complaint Response Time}}.",
                  "You will receive a case number to follow the progress."],
    },
    ("FEEDBACK", "review"): {
        "ask": ["leave a review for the $product", "share feedback about my order",
                "write an opinion about your service", "rate the $product I received $when"],
        "open": ["Thank you for wanting to share your opinion; reviews help other customers a lot.",
                 "We love hearing from customers, so thank you for taking the time."],
        "steps": ["Open the $product page on {{Website URL}}.",
                  "Scroll to {{Reviews}} and click {{Write a Review}}.",
                  "Give a star rating and tell others what you liked or did not.",
                  "Submit it; it appears after a short moderation check."],
    },
    ("SUBSCRIPTION", "newsletter_subscription"): {
        "ask": ["subscribe to your newsletter", "get emails about offers on $product deals",
                "sign up for the weekly newsletter", "join your mailing list"],
        "open": ["Great choice! Our newsletter brings offers and news straight to your inbox.",
                 "I'm happy to help you subscribe to our newsletter."],
        "steps": ["Scroll to the bottom of {{Website URL}} and find {{Newsletter}}.",
                  "Enter your email address and press {{Subscribe}}.",
                  "Confirm through the link in the welcome email.",
                  "Choose the topics you care about in {{Email Preferences}}."],
    },
    ("SUBSCRIPTION", "cancel_subscription"): {
        "ask": ["unsubscribe from your emails", "cancel my subscription to the newsletter",
                "stop receiving promotional messages", "opt out of the mailing list"],
        "open": ["I understand that you would like fewer emails from us.",
                 "No problem at all; unsubscribing takes a moment."],
        "steps": ["Open any of our emails and click {{Unsubscribe}} at the bottom.",
                  "Or go to {{Email Preferences}} in your account and untick the newsletter.",
                  "Allow up to {{Unsubscribe Period}} for the change to take effect."],
    },
    ("CANCELLATION_FEE", "check_cancellation_fee"): {
        "ask": ["know if there is a fee to cancel my order", "check the cancellation fee for order $order",
                "find out how much it costs to cancel a $product", "understand the charges for cancelling"],
        "open": ["That's a sensible thing to check before cancelling, and I'm glad to explain.",
                 "I understand you want to know about cancellation costs; here is how they work."],
        "steps": ["Orders cancelled before shipping have no fee.",
                  "Orders already shipped carry a fee of {{Cancellation Fee}}.",
                  "Custom-made items cannot be cancelled once production starts.",
                  "The exact fee for order {{Order Number}} is shown before you confirm."],
    },
}

FRAMES = [  # (template, is_question)
    ("I want to $ask", False), ("I need to $ask", False), ("I would like to $ask", False),
    ("how can I $ask?", True), ("how do I $ask?", True), ("can you help me $ask?", True),
    ("what do I have to do to $ask?", True), ("is it possible to $ask?", True),
]
NOTES = [
    "Please keep your order number {{Order Number}} at hand, since our team may ask for it to find "
    "your details faster.",
    "If anything on the page looks different from what I describe, the mobile app works the same way "
    "under {{App Menu}}.",
    "Should you run into any difficulty along the way, our team is available during {{Customer Support "
    "Hours}} at {{Customer Support Phone Number}} and will gladly finish the process with you.",
    "For your security we never ask for your full password or card number by email or phone, so please "
    "do not share them with anyone.",
    "You will find more details, screenshots and answers to similar questions in {{Help Center}}, which "
    "is updated every week.",
]
CLOSERS = [
    "If you have any other questions, I'm here to help.",
    "Is there anything else I can do for you today?",
    "Thank you for your patience, and have a wonderful day!",
    "Don't hesitate to reach out if you need more assistance; we're always happy to help.",
    "I hope this helps, and thank you for being a valued customer.",
]
COLLOQUIAL = [("I want to", "I wanna"), ("I need to", "I gotta"), ("please", "pls"), ("you", "u")]
LEXICAL = [("cancel", "call off"), ("order", "purchase"), ("help me", "assist me to"), ("know", "find out")]


def _typo(text: str, rng: random.Random) -> str:
    """Swap two adjacent letters in one longer word: the real data's `Z` (noise) variation."""
    words = text.split(" ")
    long_words = [i for i, w in enumerate(words) if len(w) > 4 and w.isalpha()]
    if not long_words:
        return text
    i = rng.choice(long_words)
    w = words[i]
    j = rng.randrange(1, len(w) - 2)
    words[i] = w[:j] + w[j + 1] + w[j] + w[j + 2:]
    return " ".join(words)


def make_instruction(spec: dict[str, list[str]], slots: dict[str, str], rng: random.Random) -> tuple[str, str]:
    ask = Template(rng.choice(spec["ask"])).safe_substitute(slots)
    frame, question = rng.choice(FRAMES)
    flags = {"B"} | ({"I"} if question else set())
    text = Template(frame).safe_substitute(ask=ask)
    if rng.random() < 0.35:
        polite = rng.choice(POLITE)
        text = f"{polite} {ask}?" if question else f"{text}, {polite} help me"
        flags.add("P")
    if rng.random() < 0.7:
        text = f"{rng.choice(GREETINGS)} {text}"
    if rng.random() < 0.6 or len(text.split()) < 10:
        text = f"{text.rstrip('?')}, {rng.choice(SUFFIXES)}" + ("?" if question else "")
    if len(text.split()) < 10:
        text = f"{text.rstrip('?')}, I ordered it {slots['when']}" + ("?" if question else "")
    for variants, flag in ((COLLOQUIAL, "Q"), (LEXICAL, "L")):
        old, new = rng.choice(variants)
        if rng.random() < 0.2 and old in text:
            text = text.replace(old, new, 1)
            flags.add(flag)
    if rng.random() < 0.15:
        text = _typo(text, rng)
        flags.add("Z")
    order = "BILPQZ"  # the real data writes flags in a fixed letter order
    return "".join(c for c in order if c in flags), text


def make_response(spec: dict[str, list[str]], slots: dict[str, str], rng: random.Random) -> str:
    steps = spec["steps"]
    # Mostly 3-5 steps, sometimes all of them: the long tail of the real data.
    n = len(steps) if rng.random() < 0.25 else rng.randint(min(3, len(steps)), len(steps))
    parts = [rng.choice(spec["open"])]
    parts.append("\n".join(f"{i}. {s}" for i, s in enumerate(steps[:n], 1)))
    n_notes = rng.choices([0, 1, 2], weights=[3, 4, 2])[0]
    parts.extend(rng.sample(NOTES, n_notes))
    parts.append(rng.choice(CLOSERS))
    while len(" ".join(parts).split()) > 150 and len(parts) > 3:
        parts.pop(-2)  # too long: drop a note rather than cut a sentence
    text = Template("\n\n".join(parts)).safe_substitute(slots)
    if len(text.split()) < 40:
        text += "\n\n" + Template(NOTES[2]).safe_substitute(slots)
    return text


def generate(seed: int = SEED) -> list[dict]:
    rng = random.Random(seed)
    rows: list[dict] = []
    for (category, intent), spec in INTENTS.items():
        for _ in range(ROWS_PER_INTENT):
            slots = {"product": rng.choice(PRODUCTS), "order": rng.choice(ORDER_IDS), "when": rng.choice(WHEN)}
            flags, instruction = make_instruction(spec, slots, rng)
            rows.append({"flags": flags, "instruction": instruction, "category": category,
                         "intent": intent, "response": make_response(spec, slots, rng)})
    rng.shuffle(rows)  # mixed intents, so `max_rows` quick runs still see every kind of request
    bad = [
        (37, lambda r: r.update(response="")),
        (150, lambda r: r.pop("instruction")),
        (263, lambda r: r.update(category=404)),
        (341, lambda r: r.update(response=None)),
    ]
    for pos, spoil in bad:
        row = dict(rows[pos])
        spoil(row)
        rows.insert(pos, row)
    return rows


def render(rows: list[dict]) -> str:
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=OUT)
    parser.add_argument("--check", action="store_true", help="fail if the file differs from what would be generated")
    args = parser.parse_args(argv)
    text = render(generate())
    if args.check:
        if not args.out.is_file() or args.out.read_text(encoding="utf-8") != text:
            print(f"{args.out} is stale; run python scripts/make_sample.py", file=sys.stderr)
            return 1
        return 0
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text, encoding="utf-8")
    print(f"wrote {text.count(chr(10))} rows to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
