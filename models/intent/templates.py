"""Hand-written domain examples for callbox's intent taxonomy (Chinese first, English second).

Written for this project (no licensed telemarketing intent set exists). Each label has
templates; `{p}` is filled with a product or service, `{c}` with a competitor, `{t}` with a
time. Templates at positions 4, 9, 14, … of each list are held out for evaluation only, so
the reported accuracy is on phrasings the model never saw.
"""

PRODUCTS_ZH = ["套餐", "这个保险", "理财产品", "贷款", "课程", "宽带", "会员卡", "这款手机", "装修服务", "信用卡"]
PRODUCTS_EN = ["plan", "insurance policy", "loan", "course", "broadband package", "membership", "card", "subscription"]
COMPETITORS_ZH = ["别家", "隔壁那家", "移动", "电信", "平安", "京东", "另一家公司", "你们同行"]
COMPETITORS_EN = ["the other company", "your competitor", "another provider", "Verizon", "the bank down the street"]
TIMES_ZH = ["下午", "明天", "晚上", "下周", "周末", "过一个小时", "三点以后", "后天上午"]
TIMES_EN = ["this afternoon", "tomorrow", "tonight", "next week", "on the weekend", "in an hour", "after three"]

ZH = {
    "price_inquiry": [
        "{p}多少钱", "这个怎么收费", "{p}一个月要多少", "价格是多少啊", "你们这个怎么卖的",
        "要交多少钱", "{p}有没有优惠价", "年费是多少", "费用怎么算", "总共要花多少钱",
        "首付要多少", "一年下来多少钱", "{p}什么价位", "利息怎么算的", "收不收手续费",
        "报个价给我", "打完折多少钱", "{p}贵不贵啊 多少钱",
    ],
    "product_question": [
        "{p}有什么功能", "这个能用在哪些地方", "支持什么支付方式", "能不能分期付款", "{p}包含哪些服务",
        "怎么办理", "需要带什么材料", "有效期多久", "保障范围是什么", "{p}和普通的有什么区别",
        "售后怎么保证", "可以退吗", "网速有多快", "在哪里可以用", "{p}适合老人吗",
        "合同期多长", "要不要押金", "到账要几天",
    ],
    "purchase_intent": [
        "那我就办一个吧", "行 给我开通", "我要买{p}", "可以 签约吧", "帮我下单",
        "那就这个了", "我想办理{p}", "怎么付款 我现在就买", "好的 我要了", "给我报名",
        "我决定买了", "现在能办吗 我要办", "把合同发我 我签", "就要这个套餐", "我愿意试试{p}",
        "马上给我安排", "确定要了",
    ],
    "callback_request": [
        "我现在在开车", "现在忙 晚点再打", "你{t}再打过来吧", "我在开会 不方便", "等会儿再说 我这边有事",
        "{t}给我回个电话", "现在不方便接电话", "约个时间再聊吧", "我在上班 下班再说", "你们{t}联系我",
        "正在吃饭 一会儿打给我", "改天再聊", "我这会儿走不开", "先挂了 {t}再说", "晚上八点以后打",
        "我在医院 回头再说",
    ],
    "hesitation": [
        "我再考虑一下", "过几天再说吧", "让我想想", "我跟家里人商量一下", "还没想好",
        "再看看吧", "不太确定", "我先了解了解", "这个我得想一想", "有点犹豫",
        "回头再决定", "我再比较比较", "等我考虑清楚再说", "嗯 这个嘛 不好说", "容我再想想",
        "先不着急", "我还要问问我老婆",
    ],
    "refusal": [
        "不需要", "不感兴趣", "不用了 谢谢", "我不要", "没兴趣",
        "算了吧", "我们已经有了", "用不上", "不买", "不考虑了",
        "真的不需要 谢谢你", "我不办", "没这个需求", "不用给我介绍了", "我用不着{p}",
        "不了不了", "这个我不要",
    ],
    "complaint": [
        "我要投诉你们", "你们这服务太差了", "骗子", "你们就是骗人的", "上次办的根本不能用",
        "我对你们很不满意", "乱扣我的钱", "你们这是欺诈", "什么破服务", "我要去消协告你们",
        "收了钱不办事", "态度太恶劣了", "你们太坑了", "一直没人处理我的问题", "我要曝光你们",
        "滚", "你脑子有病吧",
    ],
    "human_request": [
        "转人工", "你是机器人吗", "我要跟真人说话", "找你们客服", "让你们经理来接",
        "有没有人工服务", "你是不是录音", "给我转个真人", "叫个人来跟我说", "我不跟机器说话",
        "人工客服", "你们领导电话多少", "你是真人还是机器", "换个人跟我讲", "接人工",
        "我要找负责人",
    ],
    "budget_concern": [
        "太贵了", "预算有限", "我没那么多钱", "便宜点吧", "超出预算了",
        "能不能少点", "这价格我接受不了", "最近手头紧", "买不起", "有没有便宜一点的",
        "贵了 再便宜点", "钱不够", "性价比太低了", "负担不起", "打个折吧",
        "月供太高了",
    ],
    "competitor_comparison": [
        "{c}更便宜", "{c}比你们划算", "我在{c}办过了", "你们跟{c}比有什么优势", "{c}送的更多",
        "为什么不选{c}", "{c}的利息更低", "我朋友用的是{c}的", "{c}给我报价更低", "你们比{c}贵",
        "{c}也打过电话来", "跟{c}比差不多啊", "{c}的服务更好", "{c}还送礼品",
    ],
    "customization_request": [
        "能不能定制", "可以按我的要求改吗", "能不能单独给我做一个方案", "有没有个性化的", "能按我们公司的需求定制吗",
        "可以调整一下内容吗", "套餐能自己搭配吗", "能不能专门给我设计", "我想要个定制版", "能不能加点别的服务",
        "可以根据我的情况来吗", "能不能换成我要的配置", "给我量身定做一个", "能不能只要其中一部分",
    ],
    "do_not_call": [
        "别再打了", "骚扰电话", "你怎么有我号码", "以后不要给我打电话", "把我号码删了",
        "再打我就投诉", "天天打烦不烦", "不要再联系我", "我的号码谁给你的", "把我拉黑吧",
        "别打了行不行", "从你们名单里把我去掉", "一天打好几个 有完没完", "不许再打这个号码", "你们这是骚扰",
        "我说了别再打了",
    ],
}

EN = {
    "price_inquiry": [
        "how much is the {p}", "what does it cost", "how much per month", "what's the price", "is there a fee",
        "how much do I have to pay", "what's the annual fee", "give me a quote", "how much after the discount",
        "what are the charges",
    ],
    "product_question": [
        "what does the {p} include", "can I pay in installments", "how does it work", "what payment methods do you take",
        "how long is the contract", "can I cancel later", "what's covered", "do I need to bring documents",
        "is there a warranty", "where can I use it",
    ],
    "purchase_intent": [
        "ok sign me up", "I'll take the {p}", "let's do it", "I want to buy it", "go ahead and activate it",
        "where do I sign", "I'd like to order the {p}", "yes I'll buy it now", "put me down for one", "count me in",
    ],
    "callback_request": [
        "I'm driving right now", "call me back {t}", "I'm busy can you call later", "I'm in a meeting",
        "not a good time", "can we talk {t}", "I'm at work call me after five", "let's schedule a call {t}",
        "call me later", "I can't talk now",
    ],
    "hesitation": [
        "let me think about it", "I need to talk to my wife", "I'm not sure", "maybe later", "I'll think it over",
        "I need some time", "I haven't decided", "let me get back to you", "I'm on the fence", "perhaps next month",
    ],
    "refusal": [
        "not interested", "no thanks", "I don't need it", "we already have one", "no I don't want it",
        "I'll pass", "not for me", "no thank you", "I'm good", "definitely not",
    ],
    "complaint": [
        "I want to file a complaint", "your service is terrible", "you're a scam", "you charged me twice",
        "this is fraud", "I'm very unhappy with you", "nobody fixed my problem", "your staff were rude",
        "I'll report you", "worst company ever",
    ],
    "human_request": [
        "are you a robot", "let me speak to a human", "transfer me to an agent", "I want a real person",
        "get me your manager", "is this a recording", "can I talk to someone", "put a person on the line",
        "am I talking to a machine", "operator please",
    ],
    "budget_concern": [
        "that's too expensive", "I can't afford it", "it's over my budget", "can you make it cheaper",
        "money is tight right now", "that's a lot of money", "do you have anything cheaper", "the price is too high",
        "too pricey for me", "any discount",
    ],
    "competitor_comparison": [
        "{c} is cheaper", "{c} offered me a better deal", "why should I pick you over {c}", "I already use {c}",
        "{c} gives more data", "you're more expensive than {c}", "{c} has lower rates", "how do you compare to {c}",
    ],
    "customization_request": [
        "can you customize it", "can I build my own plan", "can you tailor it to my needs", "is there a custom option",
        "can you change the package for me", "I want a personalized plan", "can I pick only some features",
        "can you make a special offer for my company",
    ],
    "do_not_call": [
        "stop calling me", "take me off your list", "how did you get my number", "don't call me again",
        "this is harassment", "remove my number", "never call this number again", "put me on the do not call list",
        "you people call every day", "I told you to stop calling",
    ],
}

# English CLINC150 intents that carry one of ours (the rest are `other`).
CLINC_MAP = {"are_you_a_bot": "human_request", "maybe": "hesitation", "no": "refusal", "cancel": "refusal"}

FILLERS_ZH = ["嗯", "啊", "那个", "就是", "呃", "哎", "喂", "对"]
FILLERS_EN = ["um", "uh", "well", "so", "yeah", "hmm"]
# Characters ASR confuses (same or near-same sound).
HOMOPHONES_ZH = {
    "的": "得", "在": "再", "再": "在", "那": "哪", "吗": "嘛", "是": "事", "买": "卖", "钱": "前",
    "贵": "跪", "话": "化", "电": "店", "忙": "芒", "要": "药", "考": "烤", "虑": "律", "打": "达",
    "骗": "片", "真": "针", "人": "仁", "号": "好", "码": "马", "费": "废", "价": "假", "格": "个",
}

# More paraphrases, appended per label at the end of this file.
MORE_ZH = {
    "price_inquiry": ["大概什么价钱", "便宜的那个多少", "怎么算钱的", "一次性付清多少", "月租多少钱",
                      "有没有收费标准", "这个贵吗 具体多少", "报价单能发我吗", "价钱怎么样", "你先说说多少钱"],
    "product_question": ["具体是干什么用的", "有哪些套餐可以选", "能微信付款吗", "用起来麻烦吗", "需要本人去办吗",
                         "保修几年", "能转给别人用吗", "包不包安装", "有没有试用期", "这个怎么用"],
    "purchase_intent": ["行吧 就这么定了", "可以 那你帮我办了吧", "我同意 开始吧", "OK 我买", "没问题 我要",
                        "那就先来一份", "帮我登记一下 我要参加", "我现在就付款", "就按你说的办", "我想报名"],
    "callback_request": ["你晚点再联系我", "这会儿不方便 回头打给你", "我正忙着呢", "明天上午再打吧", "我在外面 听不清 晚点说",
                         "现在没空", "过会儿再打来", "我在地铁上 等下再说", "你先加我微信 有空再聊", "下班以后再说吧"],
    "hesitation": ["我还得想一想", "说不好 再看吧", "这个我拿不定主意", "过段时间再说", "等我回去研究一下",
                   "我回头看看再说", "不急 我再琢磨琢磨", "我先问问朋友", "让我考虑两天", "现在决定不了"],
    "refusal": ["谢谢 不用了", "我不需要这个", "你别介绍了 我不要", "没必要", "我不感兴趣 谢谢",
                "不用不用", "我们家不需要", "这个对我没用", "我拒绝", "不想要"],
    "complaint": ["你们怎么回事啊", "服务太烂了", "我要告你们", "一点都不靠谱", "你们骗了我的钱",
                  "说好的优惠呢 全是假的", "太过分了", "我非常生气", "这什么垃圾产品", "退钱"],
    "human_request": ["我要人工服务", "让真人来", "别让机器跟我说", "转接客服", "你是AI吗",
                      "请给我转人工", "我想找个人问问", "是不是自动语音", "你们有没有真人客服", "帮我接通工作人员"],
    "budget_concern": ["这么贵啊", "有点贵", "价格太高了", "我预算不够", "能优惠点吗",
                       "太贵了 买不起", "能不能再降点", "这个钱我出不起", "超过我的预算了", "有没有更实惠的"],
    "competitor_comparison": ["{c}只要一半的钱", "我觉得{c}更好", "{c}的条件比你们好", "你们和{c}哪个好", "{c}的活动力度更大",
                              "我已经用了{c}的", "{c}说可以免费", "比{c}贵多了"],
    "customization_request": ["能不能按我的需要来", "可以专门定做吗", "能改一下方案吗", "有没有定制服务", "我想自己选内容",
                              "能给我们公司单独做一套吗", "能不能根据我们的情况调整", "可以只买我需要的部分吗"],
    "do_not_call": ["以后别给我打了", "我说过不要再打电话", "这是骚扰", "别打这个电话了", "请把我从名单里删除",
                    "再打我报警了", "你们烦不烦 天天打", "不要再给我打电话了", "怎么又是你们", "谁让你打给我的"],
}

MORE_EN = {
    "price_inquiry": ["what's the monthly fee", "how much would that be", "what will it cost me", "any setup fee",
                      "tell me the price first"],
    "product_question": ["what's included", "is there a trial period", "how do I pay", "does it come with support",
                         "what are the terms"],
    "purchase_intent": ["sounds good I'm in", "alright let's sign up", "I want to go ahead", "please enroll me",
                        "I'll buy it today"],
    "callback_request": ["can you call back later", "now isn't good", "I'm busy at the moment", "try me tomorrow",
                         "call me after work"],
    "hesitation": ["I'll have to think", "not right now maybe later", "I need to discuss it first", "give me a few days",
                   "I'm still deciding"],
    "refusal": ["no I'm not interested", "we don't need that", "no, thank you", "I'm not buying", "please no"],
    "complaint": ["this is unacceptable", "I'm going to sue", "you ripped me off", "your product is garbage",
                  "I want my money back"],
    "human_request": ["I want to talk to a person", "is this an automated call", "transfer me please",
                      "connect me with a representative", "are you a real person"],
    "budget_concern": ["too much money", "I don't have that kind of budget", "can you lower the price",
                       "that's out of my price range", "any cheaper option"],
    "competitor_comparison": ["{c} charges less", "I'm happy with {c}", "{c} has a better offer",
                              "why are you pricier than {c}"],
    "customization_request": ["can I customize the package", "can you adjust it for me", "do you do custom plans",
                              "I need something tailored"],
    "do_not_call": ["quit calling me", "don't ever call again", "stop harassing me", "delete my number",
                    "who gave you my number"],
}


# Replies as they come in bill-collection and service calls (utility, phone and card bills):
# colloquial, clipped, often without a subject; written for the phrasings the real sets above
# have few of ("I'm not at home", "where do I pay", "let me think", "I'll pay today").
CALL_ZH = {
    "price_inquiry": ["我欠了多少钱", "这个月电费多少", "一共要交多少", "还差多少没交", "滞纳金多少",
                      "账单上是多少钱", "你说欠多少", "最低还多少", "水费怎么这么多 多少钱来着", "利息一共多少",
                      "多少钱啊", "要还多少"],
    "product_question": ["在哪交啊", "怎么交", "手机上能交吗", "用微信可以交吗", "支付宝能不能交",
                         "哪个银行可以交", "去哪个营业厅交", "网上怎么交", "交了以后多久到账", "能不能自动扣款",
                         "卡号是多少", "怎么查我的账单", "能开发票吗", "交完有短信吗", "可以让家里人代交吗",
                         "营业厅几点关门"],
    # No bare 好的/行/可以 in front: alone they mean what the agent asked (context pairs).
    "purchase_intent": ["我今天就去交", "我下午就交", "我马上交", "等下就还", "明天一早就去交",
                        "我这就转过去", "我交 我交", "今天就处理掉", "我现在就办", "给我开通吧",
                        "我下班就去交", "那就给我办了吧"],
    "callback_request": ["我不在家", "我在外地 回去再说", "我出差了 回来再交", "我在上班呢", "家里没人",
                         "我现在在外面", "我在开车 等会说", "人在工地上 晚上再打", "我在医院呢 过两天说", "我在干活 一会儿再说",
                         "正在上课 下课再打", "这会在高速上", "我回老家了 过完年再说", "晚上打给我吧", "现在没空 明天再打",
                         "我在忙 你过会儿打"],
    "hesitation": ["我考虑考虑", "我再想想吧", "这个我得商量一下", "我问问我老公", "回头再说吧",
                   "过两天看看", "等我想好了再说", "我跟家里人商量商量", "再说吧", "不一定",
                   "到时候再看吧", "我还没想好要不要", "这个嘛 再等等", "考虑一下 先不定"],
    "refusal": ["我不交", "不用了", "不办", "我不要这个", "这个我不需要",
                "不用不用 谢谢", "不感兴趣啊", "没打算办", "不想弄", "我已经办过了",
                "我们不用这个", "算了 不要了"],
    "complaint": ["你们是骗子吧", "诈骗电话", "我没欠你们钱 别瞎说", "凭什么扣我钱", "你们怎么乱收费",
                  "我要去投诉", "你有病吧", "神经病", "滚蛋", "什么玩意儿",
                  "我都交过了还催", "你们这是乱扣费", "再这样我报警了", "我打12345投诉你们"],
    "human_request": ["让人工来说", "我要跟人说", "你是不是机器", "别放录音了", "你是人还是机器",
                      "转你们客服", "叫你们工作人员接电话", "我不跟机器人说"],
    "budget_concern": ["没钱交", "手头紧 交不起", "我现在没钱", "等发工资再说 没钱", "太多了 交不起",
                       "能少交点吗", "能不能分几次交", "钱不够啊"],
    "competitor_comparison": ["{c}那边更便宜", "我用的是{c}的", "{c}比你们便宜一半", "我已经换成{c}了"],
    "customization_request": ["能不能给我改个套餐", "我只要流量不要通话", "能按我的用量来吗", "给我换个适合的"],
    "do_not_call": ["别打了", "不要再打了", "烦死了 天天打", "你怎么知道我号码的", "谁给你的号码",
                    "以后别打这个电话", "再打拉黑", "骚扰啊你们"],
}

# Appended per label in this order (positions continue, so every fifth is held out).
for _table, _more in ((ZH, MORE_ZH), (EN, MORE_EN), (ZH, CALL_ZH)):
    for _label, _rows in _more.items():
        _table[_label].extend(_rows)
